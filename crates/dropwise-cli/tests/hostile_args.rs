//! Hostile command-line arguments for every subcommand: zero, negative, NaN, infinite, huge and
//! malformed values for every numeric flag, malformed lists and patterns, conflicting flags, and
//! output paths that are the input, a folder, unwritable or missing. Every case must end with
//! one `error:` line (no panic, backtrace or "internal error"), a non-zero exit, the inputs
//! untouched and nothing new in the folder.
//!
//! The cases are generated from a table of each command's valid arguments and each flag's kind;
//! `HOSTILE_TABLE=FILE` writes every case and its error line as a Markdown table.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

mod common;
use common::*;

/// What a flag takes, which decides the hostile values it is fed.
#[derive(Clone, Copy)]
enum Kind {
    /// A count that must be at least 1.
    Count,
    /// A count where 0 is allowed but negative, fractional or overflowing values are not.
    Natural,
    /// A fraction in [0, 1).
    Fraction,
    /// A positive real.
    Positive,
    /// A real ≥ 0.
    NonNegative,
    /// A probability in [0, 1].
    Probability,
    /// One name from a fixed list.
    Choice,
}

fn hostile_values(kind: Kind) -> &'static [&'static str] {
    const INTS: [&str; 7] = ["-1", "1.5", "1e3", "18446744073709551616", "", "abc", "nan"];
    match kind {
        Kind::Count => &["0", "-1", "1.5", "1e3", "18446744073709551616", "", "abc", "nan"],
        Kind::Natural => &INTS,
        Kind::Fraction => &["-0.1", "1", "1.5", "nan", "inf", "-inf", "1e30", "", "abc"],
        Kind::Positive => &["0", "-1", "nan", "inf", "-inf", "1e30", "", "abc"],
        Kind::NonNegative => &["-1", "nan", "inf", "-inf", "", "abc"],
        Kind::Probability => &["-0.1", "1.5", "nan", "inf", "-inf", "", "abc"],
        Kind::Choice => &["", "bogus", "0"],
    }
}

/// A command's valid arguments (flag → value; "" for a switch) and the flags to attack.
struct Command {
    name: &'static str,
    /// Positional arguments after the command (MODEL, …).
    positional: &'static [&'static str],
    valid: &'static [(&'static str, &'static str)],
    flags: &'static [(&'static str, Kind)],
    /// Whether it writes `-o`.
    writes: bool,
}

const COMMANDS: &[Command] = &[
    Command { name: "inspect", positional: &["MODEL"], valid: &[], flags: &[("--seq-len", Kind::Count), ("--threads", Kind::Count)], writes: false },
    Command {
        name: "eval",
        positional: &["MODEL"],
        valid: &[("--data", "DATA"), ("--seq-len", "16"), ("--windows", "2")],
        flags: &[("--seq-len", Kind::Count), ("--windows", Kind::Count), ("--batch", Kind::Count), ("--threads", Kind::Count)],
        writes: false,
    },
    Command { name: "convert", positional: &["MODEL"], valid: &[("-o", "OUT")], flags: &[("--dtype", Kind::Choice)], writes: true },
    Command {
        name: "prune",
        positional: &["MODEL"],
        valid: &[("--method", "wanda"), ("--sparsity", "0.5"), ("--calib", "CALIB"), ("--seq-len", "16"), ("--calib-windows", "2"), ("-o", "OUT")],
        flags: &[
            ("--sparsity", Kind::Fraction),
            ("--seq-len", Kind::Count),
            ("--calib-windows", Kind::Count),
            ("--seed", Kind::Natural),
            ("--method", Kind::Choice),
            ("--allocation", Kind::Choice),
            ("--dtype", Kind::Choice),
            ("--threads", Kind::Count),
        ],
        writes: true,
    },
    Command {
        name: "analyze",
        positional: &["MODEL"],
        valid: &[("--calib", "CALIB"), ("--seq-len", "16"), ("--calib-windows", "2")],
        flags: &[("--seq-len", Kind::Count), ("--calib-windows", Kind::Count), ("--seed", Kind::Natural)],
        writes: false,
    },
    Command {
        name: "drop-layers",
        positional: &["MODEL"],
        valid: &[("--count", "1"), ("--metric", "bi"), ("--calib", "CALIB"), ("--seq-len", "16"), ("--calib-windows", "2"), ("-o", "OUT")],
        flags: &[
            ("--count", Kind::Count),
            ("--seq-len", Kind::Count),
            ("--calib-windows", Kind::Count),
            ("--seed", Kind::Natural),
            ("--metric", Kind::Choice),
            ("--part", Kind::Choice),
            ("--group-size", Kind::Count),
            ("--learn-tokens", Kind::Count),
            ("--learn-lora-rank", Kind::Count),
            ("--learn-lr", Kind::Positive),
            ("--learn-init", Kind::Choice),
        ],
        writes: true,
    },
    Command {
        name: "shrink",
        positional: &["MODEL"],
        valid: &[("--neurons", "0.25"), ("--importance", "activation"), ("--calib", "CALIB"), ("--seq-len", "16"), ("--calib-windows", "2"), ("-o", "OUT")],
        flags: &[
            ("--neurons", Kind::Fraction),
            ("--heads", Kind::Fraction),
            ("--neuron-multiple", Kind::Count),
            ("--seq-len", Kind::Count),
            ("--calib-windows", Kind::Count),
            ("--importance", Kind::Choice),
            ("--allocation", Kind::Choice),
            ("--head-unit", Kind::Choice),
        ],
        writes: true,
    },
    Command {
        name: "quantize",
        positional: &["MODEL"],
        valid: &[("--bpw", "6.0"), ("--importance", "outliers"), ("-o", "OUT")],
        flags: &[("--bpw", Kind::Positive), ("--importance", Kind::Choice), ("--embed-type", Kind::Choice), ("--uniform", Kind::Choice)],
        writes: true,
    },
    Command {
        name: "generate",
        positional: &["MODEL"],
        valid: &[("--prompt", "hello"), ("--max-tokens", "4")],
        flags: &[("--max-tokens", Kind::Count), ("--temperature", Kind::NonNegative), ("--seed", Kind::Natural)],
        writes: false,
    },
    Command {
        name: "bench",
        positional: &["MODEL"],
        valid: &[("--data", "DATA"), ("--seq-len", "16"), ("--windows", "2")],
        flags: &[("--seq-len", Kind::Count), ("--windows", Kind::Count)],
        writes: false,
    },
    Command {
        name: "recover",
        positional: &["MODEL"],
        valid: &[("--teacher", "MODEL"), ("--train", "CALIB"), ("--seq-len", "16"), ("--tokens", "32"), ("-o", "OUT")],
        flags: &[
            ("--tokens", Kind::Count),
            ("--seq-len", Kind::Count),
            ("--lr", Kind::Positive),
            ("--warmup", Kind::Fraction),
            ("--accumulate", Kind::Count),
            ("--clip", Kind::NonNegative),
            ("--temperature", Kind::Positive),
            ("--weight-decay", Kind::Fraction),
            ("--seed", Kind::Natural),
            ("--eval-windows", Kind::Count),
            ("--eval-every", Kind::Natural),
            ("--loss", Kind::Choice),
            ("--params", Kind::Choice),
            ("--feature-weight", Kind::NonNegative),
            ("--lora-rank", Kind::Count),
            ("--checkpoint-every", Kind::Count),
            ("--dropout", Kind::Fraction),
            ("--select-blocks", Kind::Count),
            ("--dtype", Kind::Choice),
            ("--threads", Kind::Count),
        ],
        writes: true,
    },
    Command {
        name: "fit",
        positional: &["MODEL"],
        valid: &[("--target-size", "1"), ("--calib", "CALIB"), ("--seq-len", "16"), ("--calib-windows", "2"), ("--bpw", "6,8.5"), ("--neurons", "0.25"), ("--check", "1"), ("-o", "OUT")],
        flags: &[
            ("--target-size", Kind::Positive),
            ("--recover-budget", Kind::Positive),
            ("--max-depth", Kind::Fraction),
            ("--check", Kind::Count),
            ("--check-windows", Kind::Count),
            ("--embed-types", Kind::Choice),
            ("--seq-len", Kind::Count),
            ("--calib-windows", Kind::Count),
            ("--seed", Kind::Natural),
            ("--threads", Kind::Count),
        ],
        writes: true,
    },
    Command { name: "tokenize", positional: &["MODEL"], valid: &[("--data", "DATA")], flags: &[("--threads", Kind::Count)], writes: false },
    // Encoders and vision models (tiny folders; their `-o` cases are in SPECIAL, since the
    // generated ones name the GGUF as the input).
    Command {
        name: "embed",
        positional: &["ENCODER"],
        valid: &[("--data", "DATA"), ("--limit", "8"), ("--calib", "CALIB")],
        flags: &[
            ("--limit", Kind::Count),
            ("--batch", Kind::Count),
            ("--split", Kind::Choice),
            ("--neighbours", Kind::Count),
            ("--tome", Kind::Fraction),
            ("--hired", Kind::Fraction),
            ("--hired-layers", Kind::Count),
            ("--diffrate", Kind::Fraction),
            ("--calib-sentences", Kind::Count),
            ("--threads", Kind::Count),
        ],
        writes: false,
    },
    Command {
        name: "eval",
        positional: &["VIT"],
        valid: &[("--data", "IMAGES")],
        flags: &[("--tome", Kind::Fraction), ("--hired", Kind::Fraction), ("--hired-layers", Kind::Count), ("--diffrate", Kind::Fraction), ("--calib-images", Kind::Count), ("--limit", Kind::Count), ("--batch", Kind::Count)],
        writes: false,
    },
    Command {
        name: "train-vit",
        positional: &[],
        valid: &[("--data", "IMAGES"), ("--epochs", "1"), ("--hidden", "8"), ("--layers", "1"), ("--heads", "2"), ("--intermediate", "8"), ("--patch", "4"), ("-o", "OUTDIR")],
        flags: &[
            ("--epochs", Kind::Count),
            ("--batch", Kind::Count),
            ("--lr", Kind::Positive),
            ("--weight-decay", Kind::Fraction),
            ("--cutmix", Kind::Probability),
            ("--multi-sample-dropout", Kind::Natural),
            ("--dropout", Kind::Fraction),
            ("--seed", Kind::Natural),
            ("--limit", Kind::Count),
            ("--exclude-class", Kind::Natural),
            ("--hidden", Kind::Count),
            ("--layers", Kind::Count),
            ("--heads", Kind::Count),
            ("--intermediate", Kind::Count),
            ("--patch", Kind::Count),
        ],
        writes: false,
    },
    Command {
        name: "forget",
        positional: &["VIT"],
        valid: &[("--forget", "1"), ("--retain", "IMAGES"), ("-o", "OUTDIR")],
        flags: &[("--alpha", Kind::Positive), ("--lambda", Kind::Positive), ("--batch", Kind::Count)],
        writes: false,
    },
    Command {
        name: "prune",
        positional: &["ENCODER"],
        valid: &[("--method", "wanda"), ("--sparsity", "0.5"), ("--calib", "CALIB"), ("--calib-samples", "4"), ("-o", "OUTDIR")],
        flags: &[("--sparsity", Kind::Fraction), ("--calib-samples", Kind::Count), ("--method", Kind::Choice), ("--seed", Kind::Natural)],
        writes: false,
    },
    Command {
        name: "shrink",
        positional: &["VIT"],
        valid: &[("--heads", "0.25"), ("--calib", "IMAGES"), ("--calib-samples", "4"), ("-o", "OUTDIR")],
        flags: &[("--heads", Kind::Fraction), ("--neurons", Kind::Fraction), ("--neuron-multiple", Kind::Count), ("--calib-samples", Kind::Count), ("--allocation", Kind::Choice)],
        writes: false,
    },
    Command {
        name: "drop-layers",
        positional: &["ENCODER"],
        valid: &[("--count", "1"), ("--calib", "CALIB"), ("--calib-samples", "4"), ("-o", "OUTDIR")],
        flags: &[("--count", Kind::Count), ("--calib-samples", Kind::Count), ("--metric", Kind::Choice)],
        writes: false,
    },
];

/// Cases beyond the generated ones: malformed lists and patterns, conflicts, values that parse
/// but cannot be met. (command, overrides (None removes a valid flag), what the error must say)
type Special = (&'static str, &'static [(&'static str, Option<&'static str>)], &'static str);
const SPECIAL: &[Special] = &[
    ("inspect", &[("--threads", Some("100000"))], "more than 256"),
    ("eval", &[("--reference", Some("MISSING"))], "missing"),
    ("eval", &[("--seq-len", Some("100000"))], "context"),
    ("prune", &[("--sparsity", None), ("--pattern", Some("0:4"))], "impossible"),
    ("prune", &[("--sparsity", None), ("--pattern", Some("2:0"))], "impossible"),
    ("prune", &[("--sparsity", None), ("--pattern", Some("4:2"))], "4:2"),
    ("prune", &[("--sparsity", None), ("--pattern", Some("4:4"))], "4:4"),
    ("prune", &[("--sparsity", None), ("--pattern", Some("2:4:8"))], "N:M"),
    ("prune", &[("--sparsity", None), ("--pattern", Some(":"))], "N:M"),
    ("prune", &[("--sparsity", None), ("--pattern", Some(""))], "N:M"),
    ("prune", &[("--sparsity", None), ("--pattern", Some("a:b"))], "N:M"),
    ("prune", &[("--sparsity", None), ("--pattern", Some("-2:4"))], "N:M"),
    ("prune", &[("--sparsity", None), ("--pattern", Some("2:18446744073709551616"))], "N:M"),
    ("prune", &[("--sparsity", None), ("--pattern", Some("1:1000000000000"))], "impossible"),
    ("prune", &[("--pattern", Some("2:4"))], ""),
    ("prune", &[("--sparsity", None)], "--sparsity"),
    ("prune", &[("--calib-windows", Some("100000000"))], "calibration tokens"),
    ("prune", &[("--seq-len", Some("100000"))], "context"),
    ("prune", &[("--seq-len", Some("1"))], "at least 2"),
    ("prune", &[("--calib", Some("MISSING"))], "missing"),
    ("drop-layers", &[("--count", Some("3"))], "at least one must remain"),
    ("drop-layers", &[("--metric", Some("learned")), ("--part", Some("attn"))], "whole blocks"),
    ("drop-layers", &[("--count", Some("4"))], ""),
    ("drop-layers", &[("--count", None), ("--fraction", Some("0"))], ""),
    ("drop-layers", &[("--count", None), ("--fraction", Some("-0.5"))], ""),
    ("drop-layers", &[("--count", None), ("--fraction", Some("1"))], ""),
    ("drop-layers", &[("--count", None), ("--fraction", Some("1.5"))], "fraction"),
    ("drop-layers", &[("--count", None), ("--fraction", Some("nan"))], ""),
    ("drop-layers", &[("--count", None), ("--fraction", Some("inf"))], ""),
    ("drop-layers", &[("--count", None), ("--fraction", Some("abc"))], ""),
    ("drop-layers", &[("--fraction", Some("0.3"))], ""),
    ("drop-layers", &[("--layers", Some("0"))], ""),
    ("drop-layers", &[("--count", None), ("--layers", Some(""))], ""),
    ("drop-layers", &[("--count", None), ("--layers", Some("a"))], ""),
    ("drop-layers", &[("--count", None), ("--layers", Some("0,,1"))], ""),
    ("drop-layers", &[("--count", None), ("--layers", Some("1,1"))], ""),
    ("drop-layers", &[("--count", None), ("--layers", Some("-1"))], ""),
    ("drop-layers", &[("--count", None), ("--layers", Some("7"))], "layer 7"),
    ("drop-layers", &[("--count", None), ("--layers", Some("18446744073709551616"))], ""),
    ("drop-layers", &[("--count", None), ("--layers", Some("0,1,2"))], ""),
    ("drop-layers", &[("--count", None)], ""),
    ("shrink", &[("--neurons", None), ("--heads", Some("0.99"))], "every unit"),
    ("shrink", &[("--neurons", None)], "nothing to shrink"),
    ("shrink", &[("--neurons", Some("0"))], ""),
    ("shrink", &[("--neuron-multiple", Some("1000000"))], ""),
    ("quantize", &[("--bpw", Some("2.0"))], "cannot be met"),
    ("quantize", &[("--bpw", Some("20"))], "cannot be met"),
    ("quantize", &[("--uniform", Some("Q8_0"))], "alternatives"),
    ("quantize", &[("--reuse-scores", Some("MISSING"))], "missing"),
    ("quantize", &[("--reuse-scores", Some("CALIB"))], "not a quantize --json output"),
    ("quantize", &[("--imatrix", Some(""))], "--calib"),
    ("generate", &[("--prompt", Some(""))], "prompt is empty"),
    ("generate", &[("--max-tokens", Some("100000000"))], "context"),
    ("generate", &[("--chat", Some(""))], "chat template"),
    ("generate", &[("--prompt", None)], ""),
    ("recover", &[("--teacher", None)], ""),
    ("recover", &[("--train", None)], ""),
    ("recover", &[("--teacher", Some("MISSING"))], "missing"),
    ("recover", &[("--train", Some("MISSING"))], "missing"),
    ("recover", &[("--tokens", Some("8"))], "one window"),
    ("recover", &[("--tokens", Some("100000000000"))], "training tokens"),
    ("recover", &[("--seq-len", Some("1"))], "at least 2"),
    ("recover", &[("--seq-len", Some("100000")), ("--tokens", Some("1000000"))], "context"),
    ("recover", &[("--eval", Some("CALIB"))], "both training and evaluation"),
    ("recover", &[("--eval-every", Some("2"))], "--eval"),
    ("recover", &[("--lr", Some("2"))], "(0, 1]"),
    ("recover", &[("--curves", Some("CALIB"))], ".svg"),
    ("recover", &[("--curves", Some("NOWHERE/c.svg"))], "does not exist"),
    ("recover", &[("--loss", Some("lora"))], ""),
    ("recover", &[("--select-blocks", Some("2"))], "--params selective"),
    ("recover", &[("--checkpoint", Some("CALIB"))], ".safetensors"),
    ("recover", &[("--multi-sample-dropout", Some("100"))], "more than 64"),
    ("recover", &[("--multi-sample-dropout", Some("2")), ("--loss", Some("local"))], "does not train through"),
    ("recover", &[("--resume", Some("MISSING"))], "no such checkpoint"),
    ("recover", &[("--resume", Some("CALIB"))], "not a safetensors checkpoint"),
    ("recover", &[("--params", Some("selective"))], "no block changed"),
    ("recover", &[("--lora-rank", Some("5000"))], "1..=4096"),
    ("recover", &[("--feature-weight", Some("1e30"))], "[0, 1e6]"),
    ("recover", &[("--loss", Some("local"))], "no block changed"),
    ("embed ENCODER", &[("--tome", Some("0.2")), ("--hired", Some("0.5"))], ""),
    ("embed ENCODER", &[("--reference", Some("MISSING"))], ""),
    ("embed ENCODER", &[("--data", Some("MISSING"))], "missing"),
    ("embed ENCODER", &[("--hired", Some("0.5")), ("--hired-layers", Some("100"))], "layers"),
    ("embed ENCODER", &[("--diffrate", Some("0.5")), ("--calib", None)], "--calib"),
    ("eval VIT", &[("--data", Some("CALIB"))], "not a folder"),
    ("eval VIT", &[("--tome", Some("0.2")), ("--hired", Some("0.5"))], ""),
    ("eval VIT", &[("--logits", Some("FOLDER"))], ""),
    ("eval VIT", &[("--reference", Some("ENCODER"))], ""),
    ("train-vit", &[("-o", Some("IMAGES"))], ""),
    ("train-vit", &[("-o", Some(""))], ""),
    ("train-vit", &[("-o", Some("NOWHERE/vit"))], "does not exist"),
    ("train-vit", &[("--heads", Some("3"))], "multiple of --heads"),
    ("train-vit", &[("--patch", Some("5"))], "--patch 5"),
    ("train-vit", &[("--exclude-class", Some("9"))], ""),
    ("train-vit", &[("--init", Some("MISSING"))], ""),
    ("train-vit", &[("--init", Some("ENCODER"))], ""),
    ("train-vit", &[("--data", Some("FOLDER"))], "no train-images"),
    ("forget VIT", &[("-o", Some("VIT"))], "input"),
    ("forget VIT", &[("-o", Some("IMAGES"))], ""),
    ("forget VIT", &[("--forget", Some("99"))], "not one of the model's classes"),
    ("forget VIT", &[("--forget", Some(""))], "not one of the model's classes"),
    ("forget VIT", &[("--forget", Some("FOLDER"))], "not one of the model's classes"),
    ("train-vit", &[("--init", Some("VIT")), ("-o", Some("VIT"))], "input"),
    ("train-vit", &[("--multi-sample-dropout", Some("65"))], "0..=64"),
    ("forget VIT", &[("--forget", Some("CALIB"))], "not an image index"),
    ("forget VIT", &[("--retain", Some("CALIB"))], "not a folder"),
    ("forget VIT", &[("--importances", Some("CALIB"))], "not an importance file"),
    ("prune ENCODER", &[("-o", Some("ENCODER"))], "input"),
    ("prune ENCODER", &[("--calib-windows", Some("2"))], ""),
    ("prune ENCODER", &[("--calib", Some("IMAGES"))], ""),
    ("prune ENCODER", &[("--sparsity", None), ("--pattern", Some("4:2"))], "4:2"),
    ("prune ENCODER", &[("--allocation", Some("owl"))], ""),
    ("prune ENCODER", &[("--calib-samples", Some("100000000"))], ""),
    ("shrink VIT", &[("-o", Some("VIT"))], "input"),
    ("shrink VIT", &[("--calib", Some("CALIB"))], ""),
    ("shrink VIT", &[("--head-unit", Some("group"))], ""),
    ("drop-layers ENCODER", &[("--count", Some("3"))], ""),
    ("drop-layers ENCODER", &[("--metric", Some("learned"))], ""),
    ("drop-layers ENCODER", &[("--part", Some("attn"))], ""),
    ("drop-layers ENCODER", &[("-o", Some("ENCODER"))], "input"),
];

/// Output paths that must be refused, for every command that writes one: the input itself, an
/// existing folder that is not a model, a place nobody can create a file, a folder that does
/// not exist, a "folder" that is a file, and an empty path.
const BAD_OUTPUTS: &[(&str, &str)] = &[
    ("MODEL", "input"),
    ("FOLDER", ""),
    ("/proc/dropwise-hostile.gguf", ""),
    ("NOWHERE/out.gguf", "does not exist"),
    ("CALIB/out.gguf", ""),
    ("", ""),
];

struct Case {
    name: String,
    args: Vec<String>,
    needle: String,
}

/// The command's valid arguments with `overrides` applied (None removes a flag).
fn build(cmd: &Command, overrides: &[(&str, Option<&str>)]) -> Vec<String> {
    let mut flags: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (f, v) in cmd.valid {
        flags.insert(f.to_string(), v.to_string());
        order.push(f.to_string());
    }
    for (f, v) in overrides {
        match v {
            Some(v) => {
                if flags.insert(f.to_string(), v.to_string()).is_none() {
                    order.push(f.to_string());
                }
            }
            None => {
                flags.remove(*f);
            }
        }
    }
    let mut args = vec![cmd.name.to_string()];
    args.extend(cmd.positional.iter().map(|s| s.to_string()));
    for f in order {
        let Some(v) = flags.get(&f) else { continue };
        if f == "--threads" {
            // Global: given before the command.
            args.insert(0, format!("{f}={v}"));
        } else if is_switch(&f) {
            args.push(f);
        } else {
            // `--flag=value` so that "-1" is a value, not a flag.
            args.push(format!("{f}={v}"));
        }
    }
    args
}

fn is_switch(flag: &str) -> bool {
    matches!(flag, "--imatrix" | "--chat" | "--one-shot" | "--json" | "--quantized-matmul")
}

/// A command's name in the table: with its first positional when that is not a decoder model.
fn label(cmd: &Command) -> String {
    match cmd.positional.first() {
        Some(&p) if p != "MODEL" => format!("{} {p}", cmd.name),
        _ => cmd.name.to_string(),
    }
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    // "embed ENCODER": a command by name and first positional (one name may appear twice).
    let find = |key: &str| {
        let (name, first) = key.split_once(' ').unwrap_or((key, "MODEL"));
        COMMANDS.iter().find(|c| c.name == name && c.positional.first().copied().unwrap_or("MODEL") == first).unwrap_or_else(|| panic!("no command {key}"))
    };
    for cmd in COMMANDS {
        for &(flag, kind) in cmd.flags {
            for v in hostile_values(kind) {
                let args = build(cmd, &[(flag, Some(v))]);
                out.push(Case { name: format!("{} {flag}={v:?}", label(cmd)), args, needle: String::new() });
            }
        }
        if cmd.writes {
            for (path, needle) in BAD_OUTPUTS {
                let args = build(cmd, &[("-o", Some(path))]);
                out.push(Case { name: format!("{} -o {path:?}", cmd.name), args, needle: needle.to_string() });
            }
        }
    }
    for (name, overrides, needle) in SPECIAL {
        let args = build(find(name), overrides);
        let shown: Vec<String> = overrides.iter().map(|(f, v)| match v { Some(v) => format!("{f}={v:?}"), None => format!("no {f}") }).collect();
        out.push(Case { name: format!("{name} {}", shown.join(" ")), args, needle: needle.to_string() });
    }
    out
}

/// A fresh folder with the inputs every case may name.
struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        valid_gguf(dir.path());
        let text = dropwise::testing::sample_text(4000);
        std::fs::write(dir.path().join("calib.txt"), &text).unwrap();
        std::fs::write(dir.path().join("data.txt"), &text).unwrap();
        std::fs::create_dir(dir.path().join("folder")).unwrap();
        std::fs::write(dir.path().join("folder").join("notes.txt"), "keep me").unwrap();
        // A tiny BERT and a tiny ViT (the golden folders transformers wrote) and 12×12 images
        // of 5 classes for them.
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden");
        for (from, to) in [("tiny-bert-pruned", "encoder"), ("tiny-vit-pruned", "vit")] {
            std::fs::create_dir(dir.path().join(to)).unwrap();
            for f in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"] {
                let src = golden.join(from).join(f);
                if src.exists() {
                    std::fs::copy(&src, dir.path().join(to).join(f)).unwrap();
                }
            }
        }
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        for (stem, count) in [("train", 20u32), ("t10k", 10)] {
            let mut px = vec![0, 0, 8, 3];
            [count, 12, 12].iter().for_each(|d| px.extend_from_slice(&d.to_be_bytes()));
            px.extend((0..count as usize * 144).map(|i| ((i * 37 + i / 144 * 11) % 256) as u8));
            let mut labels = vec![0, 0, 8, 1];
            labels.extend_from_slice(&count.to_be_bytes());
            labels.extend((0..count).map(|i| (i % 5) as u8));
            std::fs::write(images.join(format!("{stem}-images-idx3-ubyte")), px).unwrap();
            std::fs::write(images.join(format!("{stem}-labels-idx1-ubyte")), labels).unwrap();
        }
        Inputs { dir }
    }

    fn resolve(&self, arg: &str) -> OsString {
        let p = self.dir.path();
        let sub = |s: &str| -> String {
            s.replace("MODEL", &p.join("tiny.gguf").display().to_string())
                .replace("CALIB", &p.join("calib.txt").display().to_string())
                .replace("DATA", &p.join("data.txt").display().to_string())
                .replace("FOLDER", &p.join("folder").display().to_string())
                .replace("NOWHERE", &p.join("nowhere").display().to_string())
                .replace("MISSING", &p.join("missing.txt").display().to_string())
                .replace("ENCODER", &p.join("encoder").display().to_string())
                .replace("VIT", &p.join("vit").display().to_string())
                .replace("IMAGES", &p.join("images").display().to_string())
                .replace("OUTDIR", &p.join("out-folder").display().to_string())
                .replace("OUT", &p.join("out.gguf").display().to_string())
        };
        OsString::from(sub(arg))
    }

    /// Every file under the folder with its bytes, to show nothing was written or changed.
    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let key = p.strip_prefix(root).unwrap().display().to_string();
                if p.is_dir() {
                    out.insert(key + "/", Vec::new());
                    walk(&p, root, out);
                } else {
                    out.insert(key, std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out
    }
}

#[test]
fn every_hostile_argument_ends_in_one_clean_error() {
    let inputs = Inputs::new();
    let before = inputs.snapshot();
    let mut table = String::from("| case | error |\n|---|---|\n");
    let mut failures = Vec::new();
    let all = cases();
    for case in &all {
        let args: Vec<OsString> = case.args.iter().map(|a| inputs.resolve(a)).collect();
        let o = dropwise(&args);
        let needles: Vec<&str> = if case.needle.is_empty() { vec![] } else { vec![case.needle.as_str()] };
        match check_clean_error(&o, &needles) {
            Ok(line) => table.push_str(&format!("| `{}` | {} |\n", case.name.replace('|', "\\|"), line.replace('|', "\\|"))),
            Err(why) => failures.push(format!("{}: {why}; exit {:?}, stderr: {}", case.name, o.code, o.stderr.trim())),
        }
        let after = inputs.snapshot();
        if after != before {
            let changed: Vec<&String> = after.keys().filter(|k| before.get(*k) != after.get(*k)).chain(before.keys().filter(|k| !after.contains_key(*k))).collect();
            failures.push(format!("{}: the folder changed: {changed:?}", case.name));
            // Put it back for the next case.
            for k in after.keys().filter(|k| !before.contains_key(*k)) {
                let p = inputs.dir.path().join(k);
                let _ = if k.ends_with('/') { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
    }
    if let Ok(path) = std::env::var("HOSTILE_TABLE") {
        std::fs::write(path, &table).unwrap();
    }
    assert!(failures.is_empty(), "{} of {} hostile-argument cases failed:\n{}", failures.len(), all.len(), failures.join("\n"));
}
