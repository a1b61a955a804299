"""Model folders on disk: HF folders read without loading (hf_folder), GGUF files converted to them
(gguf_folder), synthetic random:/tiny: folders (synthetic), layers:N drafts (draft_folder), LoRA adapters
in both engines' formats (adapters)."""
