"""Training: DCD's positive / negative projectors and fine-tuning with the AIA loss.

- `dcd` (command), `dcd_data` (preference data), `dcd_config` (settings), `dcd_loop` (loop, checkpoints);
- `aia` (the loss), `aia_trainer` (command), `aia_data` (SFT rows, collator), `aia_config`, `aia_loop`;
- shared by both: `config` (settings from YAML and key=value, checked), `loop` (threads, learning-rate
  schedule, progress bar), `checkpoints` (atomic, resumable safetensors + JSON checkpoints).
"""
