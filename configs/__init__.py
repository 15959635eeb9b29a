"""Paper-default recipes, ``<method>-<dataset>.yaml``; installed as ``contrastive.recipes``."""
