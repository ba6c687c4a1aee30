//! SFT on trl's conversational format: conversations through a chat template, the loss on
//! the assistant's tokens only (trl's `assistant_only_loss`). Checked on token positions
//! (every token the loss predicts is an assistant token and every assistant token is
//! predicted) and on the loss itself (the mean next-token loss over exactly those
//! positions, computed here from the model's logits in f64).

use std::path::Path;

use lathe_core::{Device, Tensor};
use lathe_models::attention::TokenLayout;
use lathe_models::chat::{tokenize_conversation, ChatTemplate, Message, SpecialTokens};
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_train::sft::{block_loss, pack_conversations, NO_LOSS};

fn tiny_model() -> Pretrained {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("models/tests/fixtures/gguf_model_tied.gguf");
    Pretrained::load(&path, &Device::Cpu, Precision::F32).unwrap()
}

/// A ChatML-style template whose markers the tiny tokenizer spells out as plain text.
fn template() -> ChatTemplate {
    ChatTemplate::new(
        "{% for m in messages %}<{{ m.role }}> {{ m.content }} </{{ m.role }}>\n{% endfor %}\
         {% if add_generation_prompt %}<assistant>{% endif %}",
        SpecialTokens {
            eos_token: Some("</assistant>".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

fn conversations() -> Vec<Vec<Message>> {
    let turn = |q: &str, a: &str| vec![Message::new("user", q), Message::new("assistant", a)];
    let mut long = turn("what is a lathe", "a machine that turns wood");
    long.extend(turn(
        "and the tailstock",
        "it holds the far end of the work",
    ));
    vec![
        turn("hello there", "hi, how can I help"),
        long,
        vec![
            Message::new("system", "answer briefly"),
            Message::new("user", "tea or coffee"),
            Message::new("assistant", "tea"),
        ],
    ]
}

#[test]
fn only_assistant_tokens_are_predicted() {
    let model = tiny_model();
    let (tokenizer, template, convs) = (&model.tokenizer, template(), conversations());
    // The stream as pack_conversations builds it, with each token's mask.
    let mut stream = Vec::new();
    for messages in &convs {
        let tokens = tokenize_conversation(tokenizer, &template, messages).unwrap();
        stream.extend(tokens.ids.into_iter().zip(tokens.assistant_mask));
    }
    let block = 16;
    let blocks = pack_conversations(&convs, &template, tokenizer, block, 0.0, true).unwrap();
    assert!(blocks.eval.is_empty());
    // Block i of the stream is kept when it predicts an assistant token (position >= 1).
    let kept: Vec<usize> = (0..stream.len() / block)
        .filter(|&i| {
            stream[i * block + 1..(i + 1) * block]
                .iter()
                .any(|&(_, a)| a)
        })
        .collect();
    assert!(
        kept.len() < stream.len() / block,
        "a block of context only is left out"
    );
    assert_eq!(blocks.train.len(), kept.len());
    let mut learned = Vec::new();
    for (b, &i) in blocks.train.iter().zip(&kept) {
        for (j, &id) in b.iter().enumerate() {
            let (want_id, assistant) = stream[i * block + j];
            assert_eq!(id & !NO_LOSS, want_id, "block {i} token {j}");
            assert_eq!(id & NO_LOSS == 0, assistant, "block {i} token {j}");
            if assistant {
                learned.push(want_id);
            }
        }
    }
    // What is learned reads as the assistant's turns, end markers included.
    let text = tokenizer.decode(&learned, false).unwrap();
    for answer in ["hi, how can I help", "a machine that turns wood", "tea"] {
        assert!(text.contains(answer), "{text:?} lacks {answer:?}");
    }
    for context in ["hello there", "tailstock", "answer briefly", "<user>"] {
        assert!(!text.contains(context), "{text:?} holds {context:?}");
    }
    // Without assistant_only_loss every token is predicted.
    let all = pack_conversations(&convs, &template, tokenizer, block, 0.0, false).unwrap();
    assert!(all.train.iter().flatten().all(|&id| id & NO_LOSS == 0));
    // A conversation with no assistant turn has nothing to learn.
    let err = pack_conversations(
        &[vec![Message::new("user", "hello")]],
        &template,
        tokenizer,
        block,
        0.0,
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no assistant turn"), "{err}");
}

#[test]
fn the_loss_is_the_mean_over_assistant_predictions() {
    let model = tiny_model();
    let blocks = pack_conversations(
        &conversations(),
        &template(),
        &model.tokenizer,
        16,
        0.0,
        true,
    )
    .unwrap();
    let batch: Vec<&Vec<u32>> = blocks.train.iter().take(3).collect();
    let got = block_loss(&model.model, &batch, &Device::Cpu)
        .unwrap()
        .to_scalar()
        .unwrap() as f64;
    // Reference: logits of the unmasked ids, -log softmax at each predicted position.
    let (b, t) = (batch.len(), 16);
    let ids: Vec<u32> = batch
        .iter()
        .flat_map(|x| x.iter().map(|&id| id & !NO_LOSS))
        .collect();
    let layout = TokenLayout::contiguous(b, t, 0, &Device::Cpu).unwrap();
    let logits = model
        .model
        .forward(
            &Tensor::from_vec(ids.clone(), &[b, t], &Device::Cpu).unwrap(),
            &layout,
            None,
        )
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let v = logits.len() / (b * t);
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (r, block) in batch.iter().enumerate() {
        for p in 0..t - 1 {
            if block[p + 1] & NO_LOSS != 0 {
                continue;
            }
            let row = &logits[(r * t + p) * v..(r * t + p + 1) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            sum += lse - row[ids[r * t + p + 1] as usize] as f64;
            count += 1;
        }
    }
    assert!(
        count > 0 && count < b * (t - 1),
        "{count} of {} predicted",
        b * (t - 1)
    );
    let want = sum / count as f64;
    assert!(
        (got - want).abs() < 1e-4 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}
