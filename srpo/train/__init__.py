"""The trainer: `loop` (steps), `parallel` (FSDP2, process group), `checkpoint` (DCP, export)."""
