"""The stages after pretraining that train: fine-tuning on a labelled subset, the supervised baseline from
scratch, distillation into a student, and the classifier (encoder + linear) they train and save."""
