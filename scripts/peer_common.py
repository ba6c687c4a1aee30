"""Pieces the Python peers of `cargo xtask bench` share: process memory figures and loading
SmolLM2 from its GGUF file into transformers with the LM head tied as the real model has it.
The peers import this module from their own folder."""

import os


def rss_mib(field):
    """`VmHWM` (peak) or `VmRSS` (current) of this process in MiB, from /proc/self/status."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Resets this process' peak RSS (Linux: writing 5 to clear_refs); True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_gguf_causal_lm(path):
    """(model, tied): the f32 causal LM in the GGUF file at `path`. The file has no
    output.weight (SmolLM2 ties the head to the embedding) and transformers 4.46.3 then
    leaves lm_head randomly initialized with tie_word_embeddings false; the head is tied as
    the real model (and lathe) has it, and `tied` says whether that was needed."""
    import torch
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(os.path.abspath(os.path.expanduser(path)))
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, torch_dtype=torch.float32
    )
    tied = False
    if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        model.config.tie_word_embeddings = True
        model.tie_weights()
        tied = True
    return model, tied
