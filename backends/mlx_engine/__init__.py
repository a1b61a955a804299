"""The MLX engine (mlx + mlx-lm): backend.py loads and runs a model, quant.py quantizes, train.py trains LoRA."""
