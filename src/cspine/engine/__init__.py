"""What both learning stages share: the training loop with hooks, checkpoints and model-folder files, config
load/save with versions. Stage-specific code (networks, data, losses) lives in cspine.seg and cspine.cls."""
