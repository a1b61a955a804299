"""The PyTorch engine (torch + transformers + peft + trl): backend.py loads and runs a model, quant.py
quantizes (torchao, bitsandbytes), train.py trains LoRA."""
