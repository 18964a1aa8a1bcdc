"""The demo on the embedded world (`ganrm demo`) and its studies: selection (best-of-N, pruning, FK) and
fine-tuning."""
