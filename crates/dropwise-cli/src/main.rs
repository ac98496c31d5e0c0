//! `dropwise`: the command-line program. Every subcommand is a thin layer over the library;
//! errors end as one line on stderr and a non-zero exit, never a panic trace.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use dropwise::bench;
use dropwise::data;
use dropwise::eval::{self, EvalResult};
use dropwise::formats::gguf::WriteDType;
use dropwise::inspect;
use dropwise::util::human;

mod embed_cmd;
mod encoder_cmd;
mod pipeline_cmd;
mod recover_cmd;
mod vision_cmd;

#[derive(Parser)]
#[command(name = "dropwise", version, about = "Drop what a pretrained network does not need; measure what it costs and saves.")]
struct Cli {
    /// Worker threads for matmuls and scoring (default: RAYON_NUM_THREADS or all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DTypeArg> for WriteDType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => WriteDType::F32,
            DTypeArg::F16 => WriteDType::F16,
            DTypeArg::Bf16 => WriteDType::BF16,
        }
    }
}

/// Calibration text: windows of `seq_len` tokens at offsets drawn from a seeded generator.
#[derive(clap::Args, Clone)]
struct CalibArgs {
    /// Calibration text files (needed by wanda, sparsegpt, owl, rd and analyze).
    #[arg(long, num_args = 1..)]
    calib: Vec<PathBuf>,
    /// Calibration windows (default: 64 for prune and analyze, 8 for drop-layers and shrink,
    /// whose candidates each re-run part of the model).
    #[arg(long)]
    calib_windows: Option<usize>,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Calibration sentences (an encoder) or training images (a vision model), a seeded sample
    /// (default 512; decoders calibrate on --calib-windows instead).
    #[arg(long)]
    calib_samples: Option<usize>,
}

impl CalibArgs {
    /// Refuses --calib-samples where a decoder calibrates on windows.
    fn decoder_only(&self) -> Result<()> {
        if self.calib_samples.is_some() {
            bail!("--calib-samples applies to encoders and vision models; a language model calibrates on --calib-windows");
        }
        Ok(())
    }

    /// The calibration an encoder or a vision model draws (refusing the decoder's window flags).
    fn encoder(&self) -> Result<encoder_cmd::Calib<'_>> {
        if self.calib_windows.is_some() || self.seq_len != 512 {
            bail!("--calib-windows and --seq-len apply to language models; an encoder or a vision model calibrates on --calib-samples");
        }
        Ok(encoder_cmd::Calib { files: &self.calib, samples: self.calib_samples.unwrap_or(512), seed: self.seed })
    }

    /// The calibration a step draws from, `default_windows` windows unless --calib-windows says.
    fn spec(&self, default_windows: usize) -> dropwise::pipeline::CalibSpec {
        dropwise::pipeline::CalibSpec { files: self.calib.clone(), windows: self.calib_windows.unwrap_or(default_windows), seq_len: self.seq_len, seed: self.seed }
    }
}

use dropwise::pipeline::Step;

/// Worker threads beyond which `--threads` is refused: each is an OS thread with its own stack.
const MAX_THREADS: usize = 256;

/// Where and how a command writes its model.
#[derive(clap::Args, Clone)]
struct OutputArgs {
    /// Output: a path ending in .gguf is GGUF, anything else an HF folder.
    #[arg(short, long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    #[arg(long)]
    json: bool,
    /// Print the command as a recipe (for `dropwise run`) instead of running it.
    #[arg(long)]
    print_recipe: bool,
}

impl OutputArgs {
    fn target(&self) -> pipeline_cmd::Output<'_> {
        pipeline_cmd::Output { path: &self.output, dtype: self.dtype.into(), json: self.json, print_recipe: self.print_recipe }
    }
}

use dropwise::pipeline::run::refuse_overwrite;

/// Token reduction inside an encoder's or a ViT's forward pass.
#[derive(clap::Args)]
struct TokenReductionArgs {
    /// ToMe: merge this fraction of the tokens at every layer (0 to 0.5).
    #[arg(long, conflicts_with = "hired")]
    tome: Option<f64>,
    /// HiRED-style: keep this fraction of the tokens, dropped by the attention they receive
    /// (from [CLS] in a ViT, from every token in an encoder) over the first --hired-layers layers.
    #[arg(long)]
    hired: Option<f64>,
    #[arg(long, default_value_t = 2)]
    hired_layers: usize,
}

impl TokenReductionArgs {
    /// The reduction asked for, if any.
    fn reduction(&self) -> Result<Option<dropwise::model::token_reduction::TokenReduction>> {
        use dropwise::model::token_reduction::TokenReduction;
        // Checked even without --hired: a bad value is a mistake whether or not it is used.
        if self.hired_layers == 0 {
            bail!("--hired-layers must be at least 1");
        }
        Ok(match (self.tome, self.hired) {
            (Some(ratio), _) => Some(TokenReduction::Merge { ratio }),
            (_, Some(keep)) => Some(TokenReduction::Drop { keep, layers: self.hired_layers }),
            _ => None,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Architecture, shapes, parameter count, bytes by dtype, FLOPs per token.
    Inspect {
        /// A GGUF file or an HF model folder.
        model: PathBuf,
        /// Sequence length for the FLOPs-per-token figure.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long)]
        json: bool,
    },
    /// Perplexity (and KL / top-1 agreement against a reference) on the austen protocol. Several
    /// models are evaluated on the same windows with one reference pass per window.
    Eval {
        /// One or more models (GGUF files or HF folders).
        #[arg(required = true, num_args = 1..)]
        model: Vec<PathBuf>,
        /// Text files, tokenized and concatenated in order.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Number of consecutive windows from the start of the text.
        #[arg(long, default_value_t = 64)]
        windows: usize,
        /// A model to compare against on the same windows (KL divergence, top-1 agreement).
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Windows per forward pass (results are identical; 1 is fastest on small CPUs).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Keep block-quantized linear weights of GGUF models as stored and run them with
        /// quantized matmuls (as llama.cpp does: activations rounded to each type's 8-bit
        /// partner, Q8_0/Q8_1/Q8_K) instead of dequantizing them to f32.
        #[arg(long)]
        quantized_matmul: bool,
        /// Vision models: token reduction.
        #[command(flatten)]
        reduce: TokenReductionArgs,
        /// Vision models: DiffRate-style, search per-layer prune and merge rates that bring the
        /// FLOPs to this fraction of the dense model's (greedy, by KL on training images), then
        /// evaluate them.
        #[arg(long, conflicts_with_all = ["tome", "hired"])]
        diffrate: Option<f64>,
        /// Training images the --diffrate search scores on.
        #[arg(long, default_value_t = 500)]
        calib_images: usize,
        /// Vision models: at most this many test images, from the start.
        #[arg(long)]
        limit: Option<usize>,
        /// Vision models: write the test images' logits to this file (f32 little-endian,
        /// images × classes).
        #[arg(long)]
        logits: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Train a vision transformer on an IDX image folder (Fashion-MNIST) and write it as an HF
    /// folder (ViTForImageClassification) that transformers loads.
    TrainVit {
        /// Folder with train-/t10k- images-idx3-ubyte and labels-idx1-ubyte.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 10)]
        epochs: usize,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Peak learning rate (AdamW, linear warm-up then cosine decay).
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0.05)]
        weight_decay: f64,
        /// CutMix: the probability that a batch gets boxes of its other images pasted in.
        #[arg(long, default_value_t = 0.0)]
        cutmix: f64,
        /// Multi-sample dropout: dropout masks on the classifier's input, losses averaged.
        #[arg(long, default_value_t = 0)]
        multi_sample_dropout: usize,
        /// Drop probability of the multi-sample dropout masks.
        #[arg(long, default_value_t = 0.5)]
        dropout: f64,
        /// Train without random horizontal flips.
        #[arg(long)]
        no_flip: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Train on at most this many images (a fixed seeded subset), for quick runs.
        #[arg(long)]
        limit: Option<usize>,
        /// Start from this ViT folder (fine-tuning; the shape options are then ignored).
        #[arg(long)]
        init: Option<PathBuf>,
        /// Leave this class's training images out (number or name): the retrained-without-class
        /// model unlearning is measured against.
        #[arg(long)]
        exclude_class: Option<String>,
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        #[arg(long, default_value_t = 4)]
        layers: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 128)]
        intermediate: usize,
        /// Patch side in pixels (divides the image side).
        #[arg(long, default_value_t = 4)]
        patch: usize,
        #[arg(short, long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Selective Synaptic Dampening: make a vision model forget a class, or listed training
    /// images, without retraining (Fisher importances on the forget images and on all training
    /// images; parameters far more important to the forget images are scaled down).
    Forget {
        model: PathBuf,
        /// The class to forget (number or name), or a text file listing the training images
        /// to forget (0-based indices into --retain's training split, one per line).
        #[arg(long)]
        forget: String,
        /// The image folder whose training split is the data to keep serving (and whose test
        /// split measures the result).
        #[arg(long)]
        retain: PathBuf,
        /// Selection: dampen where forget importance > alpha × training importance.
        #[arg(long, default_value_t = 10.0)]
        alpha: f64,
        /// Dampening: scale by min(lambda × training importance / forget importance, 1).
        #[arg(long = "lambda", default_value_t = 1.0)]
        lambda: f64,
        /// Images per gradient in the importance estimates.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Keep the two importances in this file and reuse them when they are for the same
        /// model and class (a sweep of --alpha/--lambda then costs no gradients).
        #[arg(long)]
        importances: Option<PathBuf>,
        #[arg(short, long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Convert between GGUF and an HF folder (an output ending in .gguf is GGUF, else a folder).
    Convert {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
    },
    /// Prune the decoder's linear layers: magnitude, Wanda or SparseGPT; unstructured or N:M.
    Prune {
        model: PathBuf,
        #[arg(long, default_value = "wanda")]
        method: String,
        /// Fraction of each linear layer's weights to zero (per output row).
        #[arg(long, conflicts_with = "pattern", required_unless_present = "pattern")]
        sparsity: Option<f64>,
        /// N:M pattern, e.g. 2:4 (keep 2 of every 4 consecutive input weights).
        #[arg(long)]
        pattern: Option<String>,
        /// How the budget is spread over layers: uniform, owl or rd.
        #[arg(long, default_value = "uniform")]
        allocation: String,
        #[command(flatten)]
        calib: CalibArgs,
        /// Take every statistic from the dense model instead of the already-pruned layers.
        #[arg(long)]
        one_shot: bool,
        /// Also measure this machine's f32 GEMM peak (before loading) and report calibration
        /// throughput as a fraction of it, so times compare across noisy machines.
        #[arg(long)]
        gemm_peak: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Per-layer diagnostics: PQ Index, outlier ratio, Block Influence, activation norms.
    Analyze {
        model: PathBuf,
        #[command(flatten)]
        calib: CalibArgs,
        /// Write an HTML page with plots across depth into this folder.
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Drop whole blocks, or their attention or MLP sub-blocks, chosen by Block Influence (bi),
    /// the additive one-shot KL criterion (additive), greedy calibration perplexity (ppl) or
    /// TinyFusion's trained keep-patterns (learned).
    DropLayers {
        model: PathBuf,
        /// How many blocks to drop.
        #[arg(long, conflicts_with_all = ["fraction", "layers"], required_unless_present_any = ["fraction", "layers"])]
        count: Option<usize>,
        /// Fraction of the blocks to drop (rounded to the nearest count).
        #[arg(long, conflicts_with = "layers")]
        fraction: Option<f64>,
        /// Exactly these blocks (comma-separated, from 0), no scoring.
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<usize>>,
        /// bi, additive, ppl or learned (default additive; an encoder or a vision model: bi).
        #[arg(long)]
        metric: Option<String>,
        /// What to remove from each chosen block: block, attn or mlp.
        #[arg(long, default_value = "block")]
        part: String,
        /// learned: blocks per group (default: the smallest size ≥ 4 that splits the blocks and
        /// the count evenly, else 10).
        #[arg(long)]
        group_size: Option<usize>,
        /// learned: training tokens (the calibration windows, cycled).
        #[arg(long, default_value_t = 16384)]
        learn_tokens: usize,
        /// learned: rank of the LoRA adapters trained beside the choice.
        #[arg(long, default_value_t = 8)]
        learn_lora_rank: usize,
        /// learned: the adapters' learning rate (the choice trains at ten times it).
        #[arg(long, default_value_t = 5e-4)]
        learn_lr: f64,
        /// learned: where the pattern logits start: additive (the single-removal KLs) or uniform.
        #[arg(long, default_value = "additive")]
        learn_init: String,
        #[command(flatten)]
        calib: CalibArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove attention heads and MLP neurons; tensors become physically smaller.
    Shrink {
        model: PathBuf,
        /// Fraction of query heads to remove.
        #[arg(long, default_value_t = 0.0)]
        heads: f64,
        /// Fraction of MLP neurons to remove.
        #[arg(long, default_value_t = 0.0)]
        neurons: f64,
        /// activation, magnitude or taylor.
        #[arg(long, default_value = "activation")]
        importance: String,
        /// uniform (same cut in every layer) or global (lowest scores wherever they are).
        #[arg(long, default_value = "uniform")]
        allocation: String,
        /// query (one query head from every KV group at a time) or group (whole KV groups).
        #[arg(long, default_value = "query")]
        head_unit: String,
        /// Neurons go in runs of this many (32 keeps widths quantizable in GGUF blocks).
        #[arg(long, default_value_t = 32)]
        neuron_multiple: usize,
        #[command(flatten)]
        calib: CalibArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Quantize to GGUF block types at a fractional bits-per-weight budget, bits allocated by
    /// layer importance (or one uniform type with --uniform).
    Quantize {
        model: PathBuf,
        /// Average bits per weight of the block linears (q, k, v, o, gate, up, down).
        #[arg(long)]
        bpw: Option<f64>,
        /// lim (1 − cos of block input and output), outliers (share of weights with z-score > 1;
        /// fewer ranks higher) or kld (measured KL when the block alone is quantized lower).
        #[arg(long, default_value = "lim")]
        importance: String,
        /// Weight the quantization error by calibration activations (llama.cpp's imatrix).
        #[arg(long)]
        imatrix: bool,
        /// One type for every block linear instead of a plan (k-quants fall back to 32-block
        /// types where rows are not a multiple of 256, as llama.cpp does).
        #[arg(long)]
        uniform: Option<String>,
        /// Type of the token embedding (and an untied output head).
        #[arg(long, default_value = "Q8_0")]
        embed_type: String,
        /// Take the layer scores from an earlier `quantize --json` output of the same model,
        /// importance and imatrix setting instead of measuring them again (kld takes minutes).
        #[arg(long)]
        reuse_scores: Option<PathBuf>,
        #[command(flatten)]
        calib: CalibArgs,
        /// Output GGUF file.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        json: bool,
        /// Print the command as a recipe (for `dropwise run`) instead of running it.
        #[arg(long)]
        print_recipe: bool,
    },
    /// Token ids of text files as the model's tokenizer makes them (no BOS), as a JSON array.
    Tokenize {
        model: PathBuf,
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
    },
    /// Continue a prompt (greedy at temperature 0) with a KV cache; reports prefill and decode
    /// tokens/s. The text goes to stdout as it is written, the figures to stderr.
    Generate {
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 is greedy decoding; above 0, sampling from softmax(logits / T).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in the model's chat template (one user turn, then the assistant's).
        #[arg(long)]
        chat: bool,
        /// Keep block-quantized weights as stored (see eval --quantized-matmul).
        #[arg(long)]
        quantized_matmul: bool,
        #[arg(long)]
        json: bool,
    },
    /// Heal a dropped or pruned model: train it (the student) to reproduce the model it was cut
    /// from (the teacher) by distillation; pruned weights stay zero.
    Recover(recover_cmd::RecoverArgs),
    /// Run a recipe: a model, its calibration and evaluation text and the steps that change it
    /// (prune, drop-layers, shrink, recover, quantize), chained in memory; one file written.
    Run {
        /// The recipe (TOML; every step command prints its own with --print-recipe).
        recipe: PathBuf,
        /// Output (instead of the recipe's `output`).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print the recipe as dropwise reads it (every option explicit) instead of running it.
        #[arg(long)]
        print_recipe: bool,
        /// Write an HTML page of the run (a table per step, choices across depth, quality
        /// against size and speed) into this folder.
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Sentence embeddings from an encoder (a BERT-family HF folder such as all-MiniLM-L6-v2):
    /// one line of numbers per sentence, pooled and normalized as sentence-transformers does.
    Embed {
        model: PathBuf,
        /// Text files.
        #[arg(long, num_args = 1..)]
        data: Vec<PathBuf>,
        /// How the text becomes sentences: one per non-empty line, or the protocol's sentences.
        #[arg(long, value_enum, default_value = "lines")]
        split: embed_cmd::Split,
        /// At most this many sentences, from the start.
        #[arg(long)]
        limit: Option<usize>,
        /// Sentences per forward pass (batched by length).
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Print each sentence's token ids instead of its embedding.
        #[arg(long)]
        ids: bool,
        /// Compare with this encoder (the dense model) on the same sentences: cosine of each
        /// sentence's embeddings, top-k neighbour agreement, sentences/s of both timed in turn.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Neighbours per sentence compared with --reference.
        #[arg(long, default_value_t = 10)]
        neighbours: usize,
        #[command(flatten)]
        reduce: TokenReductionArgs,
        /// DiffRate-style: search per-layer prune and merge rates that bring the FLOPs to this
        /// fraction of the dense model's (greedy, by embedding cosine on --calib), then use them.
        #[arg(long, conflicts_with_all = ["tome", "hired"], requires = "calib")]
        diffrate: Option<f64>,
        /// Text the --diffrate search scores on (not the --data text).
        #[arg(long, num_args = 1..)]
        calib: Vec<PathBuf>,
        /// Sentences of --calib the search uses.
        #[arg(long, default_value_t = 200)]
        calib_sentences: usize,
        #[arg(long)]
        json: bool,
    },
    /// The best model for a budget: searches depth (blocks dropped), width (MLP neurons) and bits
    /// per weight, predicts each combination's KL from single-step costs measured alone, builds
    /// and measures the best few, and writes the best measured one (GGUF) with its recipe.
    Fit {
        model: PathBuf,
        /// The written file at most this many MB (10^6 bytes).
        #[arg(long, conflicts_with_all = ["target_speedup", "target_kl"], required_unless_present_any = ["target_speedup", "target_kl"])]
        target_size: Option<f64>,
        /// At least this many times the start model's tokens/s (measured, weights as stored).
        #[arg(long, conflicts_with = "target_kl")]
        target_speedup: Option<f64>,
        /// KL to the start model on the check windows at most this.
        #[arg(long)]
        target_kl: Option<f64>,
        /// The most blocks dropped, as a fraction of them.
        #[arg(long, default_value_t = 0.25)]
        max_depth: f64,
        /// Fractions of MLP neurons to try removing (comma-separated; 0 is always tried).
        #[arg(long, value_delimiter = ',', default_value = "0.125,0.25")]
        neurons: Vec<f64>,
        /// Bits-per-weight budgets to try (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "3.5,4,4.5,5,5.5,6,7,8.5")]
        bpw: Vec<f64>,
        /// Token-embedding types to try (comma-separated; a k-quant falls back as llama.cpp's
        /// does on rows that are not a multiple of 256).
        #[arg(long, value_delimiter = ',', default_value = "Q8_0,Q5_0,Q4_0")]
        embed_types: Vec<String>,
        /// How many of the best predicted candidates to build and measure (the best of each
        /// single family is checked besides).
        #[arg(long, default_value_t = 3)]
        check: usize,
        /// Text the checked candidates are measured on (default: the calibration files, other
        /// windows).
        #[arg(long, num_args = 1..)]
        check_data: Vec<PathBuf>,
        /// Windows the checked candidates are measured on.
        #[arg(long, default_value_t = 4)]
        check_windows: usize,
        /// Single-step costs: read from this file when it holds this model's and options', else
        /// measured and written to it (a second budget then costs only its checks).
        #[arg(long)]
        costs: Option<PathBuf>,
        /// Keep every checked candidate's file in this folder (candidate-N-FAMILY.gguf).
        #[arg(long)]
        keep_checked: Option<PathBuf>,
        /// Predict and print the plan and the front only: build and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Minutes of recovery training (kd from the start model, every parameter) spread over
        /// the best structural candidates, which are then checked healed beside the one-shot ones.
        #[arg(long)]
        recover_budget: Option<f64>,
        /// Recovery training text (default: the calibration files; it must differ from the
        /// check text).
        #[arg(long, num_args = 1.., requires = "recover_budget")]
        recover_train: Vec<PathBuf>,
        /// How many structural candidates the recovery budget heals.
        #[arg(long, default_value_t = 2, requires = "recover_budget")]
        heal: usize,
        /// Peak learning rate of the recovery.
        #[arg(long, default_value_t = 2e-4, requires = "recover_budget")]
        recover_lr: f64,
        /// Write an HTML report (the checked candidates, predicted against measured KL, the
        /// front) into this folder.
        #[arg(long)]
        report: Option<PathBuf>,
        #[command(flatten)]
        calib: CalibArgs,
        /// Output GGUF file.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The machine's f32 GEMM peak and the model's eval throughput as a fraction of it.
    Bench {
        model: PathBuf,
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        windows: usize,
        #[arg(long)]
        json: bool,
    },
}

// Eval allocates and frees the same large activation buffers every layer; glibc returns them to
// the kernel each time (page faults, zeroing), mimalloc keeps them for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away (`| head`).
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Errors are reported as one line; a panic is a bug, but it still gets one line, not a trace.
    std::panic::set_hook(Box::new(|info| {
        // A panic the library turns into an error (third-party parsing) is reported as that.
        if dropwise::util::catching_foreign_panic() {
            return;
        }
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("error: internal error: {}", msg.replace('\n', " "));
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // Usage errors get one line too; the usage text is one `--help` away.
            // The message may continue on indented lines (the missing arguments); they are
            // joined up to the usage text.
            let text = e.render().to_string();
            let message: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information")).filter(|l| !l.is_empty()).collect();
            let line = if message.is_empty() { "error: invalid arguments".to_string() } else { message.join(" ") };
            eprintln!("{line} (see --help)");
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // All work runs inside one pool of N threads: the thread driving the model is one of the N,
    // so between parallel matmuls it does not compete with N idle-spinning workers for N cores
    // (measured ~3% faster eval on 2 cores than driving the global pool from the main thread).
    let go = || -> Result<()> {
        let threads = thread_count(cli.threads)?;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("cannot start worker threads")?;
        pool.install(|| run(cli, threads))
    };
    match std::panic::catch_unwind(go) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(101),
    }
}

/// Worker threads: `--threads`, else `RAYON_NUM_THREADS`, else all cores. candle's matmul reads
/// `RAYON_NUM_THREADS` for its own split, so it is set to the same number.
fn thread_count(n: Option<usize>) -> Result<usize> {
    let n = match n {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) if n > MAX_THREADS => bail!("--threads {n} is more than {MAX_THREADS}"),
        Some(n) => n,
        None => std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&v| v > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
            .min(MAX_THREADS),
    };
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    Ok(n)
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, {elapsed} elapsed, eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn run(cli: Cli, threads: usize) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { model, seq_len, json } => cmd_inspect(model, seq_len, json),
        Cmd::Eval { model, data, seq_len, windows, reference, batch, quantized_matmul, reduce, diffrate, calib_images, limit, logits, json } => {
            let reduction = reduce.reduction()?;
            if model.iter().any(|m| dropwise::model::vit::is_vit_folder(m)) {
                let reduction = reduction.unwrap_or(dropwise::model::token_reduction::TokenReduction::None);
                return vision_cmd::cmd_eval_vit(&model, vision_cmd::EvalVitArgs { data, reference, reduction, batch, limit, diffrate, calib_images, logits, json });
            }
            if reduction.is_some() || limit.is_some() || logits.is_some() || diffrate.is_some() {
                bail!("--tome, --hired, --diffrate, --limit and --logits apply to vision models (a ViT folder); language models are evaluated on --windows");
            }
            cmd_eval(model, data, seq_len, windows, reference, batch, quantized_matmul, json, threads)
        }
        Cmd::Forget { model, forget, retain, alpha, lambda, batch, importances, out, json } => vision_cmd::cmd_forget(&model, vision_cmd::ForgetArgs { forget, retain, alpha, lambda, batch, importances, out, json }),
        Cmd::TrainVit { data, epochs, batch, lr, weight_decay, cutmix, multi_sample_dropout, dropout, no_flip, seed, limit, init, exclude_class, hidden, layers, heads, intermediate, patch, out, json } => {
            let shape = dropwise::vision::train::VitShape { hidden, layers, heads, intermediate, patch };
            let opts = dropwise::vision::train::TrainOptions { epochs, batch, lr, weight_decay, warmup: 0.05, cutmix, multi_sample_dropout, dropout, flip: !no_flip, seed, limit };
            vision_cmd::cmd_train_vit(vision_cmd::TrainVitArgs { data, init, exclude_class, shape, opts, out, json })
        }
        Cmd::Convert { input, output, dtype } => cmd_convert(input, output, dtype.into()),
        Cmd::Prune { model, method, sparsity, pattern, allocation, calib, one_shot, gemm_peak, out } => {
            if encoder_cmd::is_encoder(&model) {
                if allocation != "uniform" {
                    bail!("--allocation {allocation}: encoders and vision models are pruned uniformly (owl and rd are for language models)");
                }
                if gemm_peak || out.print_recipe || !matches!(out.dtype, DTypeArg::F32) {
                    bail!("--gemm-peak, --print-recipe and --dtype apply to language models; an encoder or a vision model is written as an f32 folder");
                }
                let pattern = match (sparsity, pattern.as_deref()) {
                    (_, Some(p)) => dropwise::prune::Pattern::parse_nm(p)?,
                    (Some(s), None) => dropwise::prune::Pattern::unstructured(s)?,
                    (None, None) => bail!("give --sparsity S or --pattern N:M"),
                };
                let job = encoder_cmd::Job::Prune { method: dropwise::prune::Method::parse(&method)?, pattern, one_shot };
                return encoder_cmd::run(&model, job, calib.encoder()?, encoder_cmd::Out { path: &out.output, json: out.json });
            }
            calib.decoder_only()?;
            let opts = PruneArgs { method, sparsity, pattern, allocation, calib, one_shot, gemm_peak };
            cmd_prune(model, opts, out)
        }
        Cmd::Run { recipe, output, print_recipe, report, json } => pipeline_cmd::cmd_run(&recipe, output, json, print_recipe, report),
        Cmd::Analyze { model, calib, report, json } => {
            calib.decoder_only()?;
            cmd_analyze(model, calib, report, json)
        }
        Cmd::Tokenize { model, data } => {
            let m = dropwise::load(&model)?;
            println!("{}", serde_json::to_string(&data::tokenize_files(&m.tokenizer, &data)?)?);
            Ok(())
        }
        Cmd::DropLayers { model, count, fraction, layers, metric, part, group_size, learn_tokens, learn_lora_rank, learn_lr, learn_init, calib, out } => {
            use dropwise::pipeline::steps::drop_layers::{parse_init, DropLayersStep, Which, DEFAULT_WINDOWS};
            let init = parse_init(&learn_init)?;
            let learned = dropwise::structural::LearnedOptions { group_size, tokens: learn_tokens, lora_rank: learn_lora_rank, lr: learn_lr, seed: calib.seed, init };
            let which = match (count, fraction, layers) {
                (_, _, Some(l)) => Which::Layers(l),
                (Some(c), _, _) => Which::Count(c),
                (None, Some(f), None) => Which::Fraction(f),
                _ => Which::Count(0),
            };
            if encoder_cmd::is_encoder(&model) {
                let metric = metric.as_deref().unwrap_or("bi");
                if metric != "bi" || part != "block" {
                    bail!("an encoder or a vision model drops whole blocks by Block Influence: --metric bi --part block, not --metric {metric} --part {part}");
                }
                if out.print_recipe || !matches!(out.dtype, DTypeArg::F32) {
                    bail!("--print-recipe and --dtype apply to language models; an encoder or a vision model is written as an f32 folder");
                }
                let which = match which {
                    Which::Layers(l) => dropwise::encoder::depth::DropWhich::Layers(l),
                    Which::Count(c) => dropwise::encoder::depth::DropWhich::Count(c),
                    Which::Fraction(f) => {
                        if !(f.is_finite() && (0.0..1.0).contains(&f)) {
                            bail!("--fraction is a share of the blocks in [0, 1), not {f}");
                        }
                        let n = if dropwise::model::bert::is_bert_folder(&model) {
                            dropwise::model::bert::BertConfig::from_hf_json(&std::fs::read_to_string(model.join("config.json"))?)?.num_hidden_layers
                        } else {
                            dropwise::model::vit::VitConfig::from_hf_json(&std::fs::read_to_string(model.join("config.json"))?)?.num_hidden_layers
                        };
                        dropwise::encoder::depth::DropWhich::Count((f * n as f64).round() as usize)
                    }
                };
                return encoder_cmd::run(&model, encoder_cmd::Job::Drop(which), calib.encoder()?, encoder_cmd::Out { path: &out.output, json: out.json });
            }
            calib.decoder_only()?;
            let metric = dropwise::structural::LayerMetric::parse(metric.as_deref().unwrap_or("additive"))?;
            let part = dropwise::structural::Part::parse(&part)?;
            let step = DropLayersStep::new(which, metric, part, learned, calib.spec(DEFAULT_WINDOWS))?;
            if step.trains() && !out.print_recipe {
                // It trains: the same reuse of freed activations as recover's.
                recover_cmd::keep_freed_memory();
            }
            pipeline_cmd::one_step(&model, Box::new(step), out.target(), calib.seq_len, &mut |_, _| {})
        }
        Cmd::Shrink { model, heads, neurons, importance, allocation, head_unit, neuron_multiple, calib, out } => {
            use dropwise::pipeline::steps::shrink::{ShrinkStep, DEFAULT_WINDOWS};
            use dropwise::structural::width::{check_options, HeadUnit, Importance, ShrinkOptions, WidthAllocation};
            if encoder_cmd::is_encoder(&model) {
                if importance != "activation" || head_unit != "query" {
                    bail!("an encoder or a vision model is shrunk by activation importance, one head at a time: --importance activation --head-unit query");
                }
                if out.print_recipe || !matches!(out.dtype, DTypeArg::F32) {
                    bail!("--print-recipe and --dtype apply to language models; an encoder or a vision model is written as an f32 folder");
                }
                let opts = dropwise::encoder::width::EncoderShrinkOptions { heads, neurons, allocation: WidthAllocation::parse(&allocation)?, neuron_multiple };
                dropwise::encoder::width::check_options(&opts)?;
                return encoder_cmd::run(&model, encoder_cmd::Job::Shrink(opts), calib.encoder()?, encoder_cmd::Out { path: &out.output, json: out.json });
            }
            calib.decoder_only()?;
            let opts = ShrinkOptions {
                heads,
                neurons,
                importance: Importance::parse(&importance)?,
                allocation: WidthAllocation::parse(&allocation)?,
                head_unit: HeadUnit::parse(&head_unit)?,
                neuron_multiple,
            };
            check_options(&opts)?;
            let step = ShrinkStep { opts, calib: calib.spec(DEFAULT_WINDOWS) };
            pipeline_cmd::one_step(&model, Box::new(step), out.target(), calib.seq_len, &mut |_, _| {})
        }
        Cmd::Quantize { model, bpw, importance, imatrix, uniform, embed_type, reuse_scores, calib, output, json, print_recipe } => {
            use dropwise::pipeline::steps::quantize::{QuantizeStep, DEFAULT_WINDOWS};
            calib.decoder_only()?;
            let step = QuantizeStep::new(bpw, &importance, imatrix, uniform.as_deref(), &embed_type, reuse_scores, calib.spec(DEFAULT_WINDOWS))?;
            let out = pipeline_cmd::Output { path: &output, dtype: WriteDType::F32, json, print_recipe };
            pipeline_cmd::one_step(&model, Box::new(step), out, calib.seq_len, &mut pipeline_cmd::written_json)
        }
        Cmd::Fit { model, target_size, target_speedup, target_kl, max_depth, neurons, bpw, embed_types, check, check_data, check_windows, costs, keep_checked, dry_run, recover_budget, recover_train, heal, recover_lr, report, calib, output, json } => {
            use dropwise::pipeline::fit::{FitOptions, Target};
            calib.decoder_only()?;
            let target = match (target_size, target_speedup, target_kl) {
                (Some(mb), _, _) if mb.is_finite() && mb > 0.0 && mb < 1e9 => Target::Bytes((mb * 1e6) as u64),
                (Some(mb), _, _) => bail!("--target-size must be a positive number of MB, not {mb}"),
                (_, Some(x), _) if x.is_finite() && x > 0.0 && x <= 1000.0 => Target::Speedup(x),
                (_, Some(x), _) => bail!("--target-speedup must be a number in (0, 1000], not {x}"),
                (_, _, Some(k)) if k.is_finite() && k >= 0.0 => Target::Kl(k),
                (_, _, Some(k)) => bail!("--target-kl must be a number ≥ 0, not {k}"),
                _ => bail!("give a budget: --target-size MB, --target-speedup X or --target-kl K"),
            };
            if !(max_depth.is_finite() && (0.0..1.0).contains(&max_depth)) {
                bail!("--max-depth is a fraction of the blocks in [0, 1), not {max_depth}");
            }
            if let Some(f) = neurons.iter().find(|f| !(f.is_finite() && (0.0..1.0).contains(*f))) {
                bail!("--neurons are fractions in [0, 1), not {f}");
            }
            if let Some(b) = bpw.iter().find(|b| !(b.is_finite() && **b > 0.0 && **b <= 32.0)) {
                bail!("--bpw levels are bits per weight in (0, 32], not {b}");
            }
            if check == 0 || check > 64 {
                bail!("--check must be in 1..=64, not {check}");
            }
            let embed_levels = embed_types.iter().map(|t| dropwise::quant::QType::parse(t).map_err(|e| anyhow::anyhow!("--embed-types: {e}"))).collect::<Result<Vec<_>>>()?;
            let spec = calib.spec(4);
            if check_windows == 0 || check_windows.saturating_mul(spec.seq_len) > dropwise::pipeline::MAX_CALIB_TOKENS {
                bail!("--check-windows must be at least 1 and at most {} tokens in all, not {check_windows}", dropwise::pipeline::MAX_CALIB_TOKENS);
            }
            let mut check_spec = FitOptions::default_check(&spec, check_windows);
            if !check_data.is_empty() {
                check_spec.files = check_data;
            }
            let recover = recover_budget.map(|minutes| dropwise::pipeline::fit::FitRecover {
                minutes,
                train: if recover_train.is_empty() { spec.files.clone() } else { recover_train },
                heal,
                lr: recover_lr,
            });
            let opts = FitOptions { target, calib: spec, check_data: check_spec, max_depth_fraction: max_depth, neuron_levels: neurons, bpw_levels: bpw, embed_levels, check, dry_run, costs, keep_checked, recover };
            pipeline_cmd::cmd_fit(&model, &opts, &output, report.as_deref(), json)
        }
        Cmd::Embed { model, data, split, limit, batch, ids, reference, neighbours, reduce, diffrate, calib, calib_sentences, json } => {
            let reduction = reduce.reduction()?.unwrap_or(dropwise::model::token_reduction::TokenReduction::None);
            embed_cmd::cmd_embed(&model, embed_cmd::EmbedArgs { data, split, limit, batch, ids, reference, neighbours, reduction, diffrate, calib, calib_sentences, json })
        }
        Cmd::Bench { model, data, seq_len, windows, json } => cmd_bench(model, data, seq_len, windows, json, threads),
        Cmd::Generate { model, prompt, max_tokens, temperature, seed, chat, quantized_matmul, json } => {
            let opts = GenerateArgs { prompt, max_tokens, temperature, seed, chat, quantized_matmul, json };
            cmd_generate(model, opts, threads)
        }
        Cmd::Recover(a) => recover_cmd::cmd_recover(a),
    }
}

fn cmd_inspect(model: PathBuf, seq_len: usize, json: bool) -> Result<()> {
    if seq_len == 0 {
        bail!("--seq-len must be at least 1");
    }
    let m = dropwise::load(&model)?;
    let r = inspect::inspect(&m, seq_len);
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let c = &r.config;
    println!("model        {} ({}, {})", r.path, r.format, if r.name.is_empty() { "unnamed" } else { &r.name });
    println!("architecture {} — {} layers, hidden {}, {} heads / {} KV heads (head dim {}), FFN {}, vocab {}",
        c.arch.name(), c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.vocab_size);
    let scaling = match &c.rope_scaling {
        None => String::new(),
        Some(dropwise::config::RopeScaling::Llama3 { factor, .. }) => format!(" (llama3 scaling ×{factor})"),
        Some(dropwise::config::RopeScaling::FreqFactors(f)) => format!(" (scaled by {} per-frequency factors)", f.len()),
    };
    println!("             rope theta {}{scaling}, rms eps {:e}, tied embeddings {}, qkv bias {}", c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings, c.attention_bias);
    println!("tokenizer    {}", r.tokenizer);
    println!("parameters   {} ({} as f32)", human(r.parameters as f64), human(r.f32_bytes as f64) + "B");
    println!("FLOPs/token  {} at seq len {}", human(r.flops_per_token), r.seq_len);
    println!("stored       {}B", human(r.stored_bytes as f64));
    println!("  {:<8} {:>8} {:>14} {:>12}", "dtype", "tensors", "elements", "bytes");
    for (d, b) in &r.bytes_by_dtype {
        println!("  {:<8} {:>8} {:>14} {:>12}", d, b.tensors, b.elements, b.bytes);
    }
    Ok(())
}

struct GenerateArgs {
    prompt: String,
    max_tokens: usize,
    temperature: f64,
    seed: u64,
    chat: bool,
    quantized_matmul: bool,
    json: bool,
}

fn cmd_generate(model: PathBuf, a: GenerateArgs, threads: usize) -> Result<()> {
    use dropwise::generate::{chat_prompt, generate, stop_tokens, GenerateOptions};
    use std::io::Write;
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let m = if a.quantized_matmul { dropwise::model::io::load_quantized(&model)? } else { dropwise::load(&model)? };
    // The chat template and the BOS rule come with the tokenizer: GGUF metadata, or an HF
    // folder's tokenizer_config.json.
    let (template, add_bos) = (m.chat_template.clone(), m.adds_bos);
    let text = if a.chat { chat_prompt(template.as_deref(), &a.prompt)? } else { a.prompt.clone() };
    let mut prompt: Vec<u32> = Vec::new();
    if add_bos {
        prompt.extend(m.model.config.bos_token_id);
    }
    prompt.extend(m.tokenizer.encode_with_special(&text)?);
    let opts = GenerateOptions { max_tokens: a.max_tokens, temperature: a.temperature, seed: a.seed, stop: stop_tokens(m.model.config.eos_token_id, &m.tokenizer) };
    // Stream the text: decode everything so far and print what is new, so a character split
    // across tokens appears whole.
    let mut so_far: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut out = std::io::stdout();
    let json = a.json;
    let g = generate(&m.model, &prompt, &opts, &mut |t| {
        so_far.push(t);
        if !json {
            let s = m.tokenizer.decode(&so_far)?;
            if s.len() > printed && s.is_char_boundary(printed) && !s.ends_with('\u{fffd}') {
                write!(out, "{}", &s[printed..])?;
                out.flush()?;
                printed = s.len();
            }
        }
        Ok(())
    })?;
    let completion = m.tokenizer.decode(&g.ids)?;
    if json {
        let mut v = serde_json::to_value(&g)?;
        v["model"] = model.display().to_string().into();
        v["prompt"] = a.prompt.into();
        v["chat"] = a.chat.into();
        v["bos_added"] = add_bos.into();
        v["text"] = completion.into();
        v["temperature"] = a.temperature.into();
        v["seed"] = a.seed.into();
        v["threads"] = threads.into();
        v["quantized_matmul"] = a.quantized_matmul.into();
        v["peak_memory_bytes"] = dropwise::util::peak_rss_bytes().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if completion.len() > printed && completion.is_char_boundary(printed) {
            write!(out, "{}", &completion[printed..])?;
        }
        println!();
        let stop = match g.stopped_by {
            Some(t) => format!("stop token {t}"),
            None => "--max-tokens".to_string(),
        };
        eprintln!("{:<10} {} tokens, {:.1} tokens/s", "prefill", g.prompt_ids.len(), g.prefill_tokens_per_second);
        eprintln!("{:<10} {} tokens, {:.1} tokens/s ({} threads; ended by {stop})", "decode", g.ids.len(), g.decode_tokens_per_second, threads);
    }
    Ok(())
}

use dropwise::pipeline::check_seq_len;

fn load_windows(m: &dropwise::LoadedModel, data: &[PathBuf], seq_len: usize, windows: usize) -> Result<Vec<Vec<u32>>> {
    check_seq_len(m, seq_len)?;
    let ids = data::tokenize_files(&m.tokenizer, data)?;
    data::eval_windows(&ids, seq_len, windows, m.window_bos())
}

fn print_eval_table(r: &EvalResult, threads: usize) {
    println!("{:<22} {}", "protocol", format!("{} ({} windows × {} tokens, {} scored)", r.protocol, r.windows, r.seq_len, r.tokens));
    println!("{:<22} {:.4}", "perplexity", r.perplexity);
    println!("{:<22} {:.5}", "mean NLL", r.nll);
    if let (Some(kl), Some(t1)) = (r.kl_divergence, r.top1_agreement) {
        println!("{:<22} {:.5}", "KL divergence", kl);
        println!("{:<22} {:.4}", "top-1 agreement", t1);
    }
    println!("{:<22} {:.1} ({} threads)", "tokens/s", r.tokens_per_second, threads);
    println!("{:<22} {:.1} GFLOP/s ({} FLOPs/token)", "achieved", r.achieved_gflops, human(r.flops_per_token));
    println!("{:<22} {:.2} s", "wall time", r.wall_seconds);
}

#[allow(clippy::too_many_arguments)]
fn cmd_eval(models: Vec<PathBuf>, data: Vec<PathBuf>, seq_len: usize, windows: usize, reference: Option<PathBuf>, batch: usize, quantized_matmul: bool, json: bool, threads: usize) -> Result<()> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    // Without --quantized-matmul a quantized file runs as the f32 model of record, its weights
    // decoded to f32 one product at a time (the same numbers as a full f32 load, in a fraction
    // of the memory).
    let load = |p: &PathBuf| if quantized_matmul { dropwise::model::io::load_quantized(p) } else { dropwise::model::io::load_decoded(p) };
    let loaded: Vec<dropwise::LoadedModel> = models.iter().map(load).collect::<Result<_>>()?;
    // Every model is scored on the first model's tokenization; a model whose tokenizer disagrees
    // would be scored on ids it never saw.
    let ws = load_windows(&loaded[0], &data, seq_len, windows)?;
    for (m, p) in loaded.iter().zip(&models).skip(1) {
        if load_windows(m, &data, seq_len, windows)? != ws {
            bail!("{} tokenizes the text differently from {}; evaluate them separately", p.display(), models[0].display());
        }
    }
    let reference = match reference {
        Some(p) => Some(dropwise::model::io::load_decoded(&p).with_context(|| "reference model".to_string())?),
        None => None,
    };
    if windows > ws.len() {
        eprintln!("note: the text holds only {} windows of {seq_len} tokens; evaluating those", ws.len());
    }
    let pb = progress(ws.len(), "eval");
    let refs: Vec<&dropwise::model::Llama> = loaded.iter().map(|m| &m.model).collect();
    let mut results = eval::evaluate_many(&refs, reference.as_ref().map(|r| &r.model), &ws, batch, &mut |i| pb.set_position(i as u64))?;
    pb.finish_and_clear();
    if loaded[0].window_bos().is_some() {
        for r in &mut results {
            r.protocol = format!("{} BOS rule (BOS + {} text tokens)", r.protocol, seq_len - 1);
        }
    }
    let peak = dropwise::util::peak_rss_bytes();
    if json {
        let mut out = Vec::new();
        for ((r, m), path) in results.iter().zip(&loaded).zip(&models) {
            let mut v = serde_json::to_value(r)?;
            v["model"] = path.display().to_string().into();
            v["data"] = serde_json::json!(data.iter().map(|d| d.display().to_string()).collect::<Vec<_>>());
            v["threads"] = threads.into();
            v["peak_memory_bytes"] = peak.into();
            v["f32_weight_bytes"] = (m.model.param_count() as u64 * 4).into();
            v["parameters"] = m.model.param_count().into();
            out.push(v);
        }
        let v = if out.len() == 1 { out.remove(0) } else { serde_json::Value::Array(out) };
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let weights: usize = loaded.iter().map(|m| m.model.param_count()).sum();
        for (i, (r, path)) in results.iter().zip(&models).enumerate() {
            if i > 0 {
                println!();
            }
            println!("{:<22} {}", "model", path.display());
            print_eval_table(r, threads);
        }
        if let Some(p) = peak {
            println!("{:<22} {}B ({:.2}× the f32 weights)", "peak memory", human(p as f64), p as f64 / (weights as f64 * 4.0));
        }
    }
    Ok(())
}

fn cmd_convert(input: PathBuf, output: PathBuf, dtype: WriteDType) -> Result<()> {
    let m = dropwise::load(&input)?;
    refuse_overwrite(&input, &output)?;
    dropwise::model::io::save(&m, &m.model, &output, dtype)?;
    let kind = if output.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) { "GGUF v3" } else { "HF folder" };
    println!("wrote {} ({kind}, {:?}, {} parameters)", output.display(), dtype, human(m.model.param_count() as f64));
    Ok(())
}

fn cmd_bench(model: PathBuf, data: Vec<PathBuf>, seq_len: usize, windows: usize, json: bool, threads: usize) -> Result<()> {
    let m = dropwise::load(&model)?;
    let ws = load_windows(&m, &data, seq_len, windows)?;
    let (_, gemms) = bench::gemm_peak(8)?;
    let r = bench::eval_vs_gemm(&m.model, &ws)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": model.display().to_string(),
                "threads": threads,
                "seq_len": seq_len,
                "gemm": gemms,
                "eval_vs_gemm": r,
            }))?
        );
    } else {
        println!("threads: {threads}, seq len {seq_len}, {} FLOPs/token", human(r.flops_per_token));
        println!("{:<24} {:>10}", "f32 GEMM [m,k]x[n,k]ᵀ", "GFLOP/s");
        for g in &gemms {
            println!("{:<24} {:>10.1}", format!("{}x{}x{}", g.m, g.k, g.n), g.gflops);
        }
        println!("{:<8} {:>14} {:>14} {:>8}", "window", "GEMM peak", "eval GFLOP/s", "ratio");
        for (i, (p, e, q)) in r.windows.iter().enumerate() {
            println!("{:<8} {:>14.1} {:>14.1} {:>7.1}%", i, p, e, 100.0 * q);
        }
        println!("{:<8} {:>14.1} {:>14.1} {:>7.1}%", "median", r.median_gemm_peak, r.median_eval_gflops, 100.0 * r.median_ratio);
        println!("eval tokens/s (median window): {:.1}", r.tokens_per_second);
    }
    Ok(())
}

struct PruneArgs {
    method: String,
    sparsity: Option<f64>,
    pattern: Option<String>,
    allocation: String,
    calib: CalibArgs,
    one_shot: bool,
    gemm_peak: bool,
}

fn cmd_prune(model: PathBuf, a: PruneArgs, out: OutputArgs) -> Result<()> {
    use dropwise::pipeline::steps::prune::{PruneStep, DEFAULT_WINDOWS};
    let step = PruneStep::new(&a.method, a.sparsity, a.pattern.clone(), &a.allocation, a.one_shot, a.calib.spec(DEFAULT_WINDOWS))?;
    refuse_overwrite(&model, &out.output)?;
    // Measured before the model loads, so the prune times stay what they are without it.
    let peak = if a.gemm_peak && !out.print_recipe { Some(bench::gemm_peak(3)?.0) } else { None };
    let seq_len = a.calib.seq_len;
    pipeline_cmd::one_step(&model, Box::new(step), out.target(), seq_len, &mut |r, v| {
        let Some(p) = peak else { return };
        // Calibration is one pass of the decoder blocks (no output head) over every window.
        let dense = &r.session.dense;
        let block_flops_per_token = dense.flops_per_token(seq_len) - 2.0 * dense.head_weight().elem_count() as f64;
        let windows = v["calibration"]["windows"].as_u64().unwrap_or(0) as usize;
        let flops = block_flops_per_token * (windows * seq_len) as f64;
        let calibrate = v["calibrate_seconds"].as_f64().unwrap_or(0.0);
        v["gemm_peak_gflops"] = p.into();
        v["calibration_gflop"] = (flops / 1e9).into();
        // The time the calibration pass would take at the GEMM peak, and how close we are.
        v["calibration_floor_seconds"] = (flops / (p * 1e9)).into();
        v["calibration_vs_peak"] = (flops / calibrate.max(1e-9) / (p * 1e9)).into();
    })
}

fn cmd_analyze(model: PathBuf, calib: CalibArgs, report: Option<PathBuf>, json: bool) -> Result<()> {
    if let Some(dir) = &report {
        if dir.exists() && !dir.is_dir() {
            bail!("--report {} exists and is not a folder", dir.display());
        }
    }
    let m = dropwise::model::io::load_decoded(&model)?;
    let (offsets, windows) = dropwise::pipeline::calibration_windows(&m, &calib.spec(64), "analyze")?;
    let (seq_len, seed) = (calib.seq_len, calib.seed);
    let pb = progress(windows.len(), "analyze");
    let rows = dropwise::analyze::analyze(&m.model, &windows, &mut |i| pb.set_position(i as u64))?;
    pb.finish_and_clear();
    let calib_desc = format!(
        "{} windows × {seq_len} tokens from {} at seeded offsets (seed {seed})",
        windows.len(),
        calib.calib.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    if let Some(dir) = &report {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let page = dropwise::analyze::html_report(&model.display().to_string(), &rows, &calib_desc);
        dropwise::util::write_atomically(&dir.join("index.html"), |f| {
            use std::io::Write;
            f.write_all(page.as_bytes())?;
            Ok(())
        })?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": model.display().to_string(),
                "calibration": {"files": calib.calib, "windows": windows.len(), "seq_len": seq_len, "seed": seed, "offsets": offsets},
                "layers": rows,
                "peak_memory_bytes": dropwise::util::peak_rss_bytes(),
            }))?
        );
    } else {
        println!("{:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}", "layer", "PQ index", "outliers", "BI", "act mean", "act max", "max/median");
        for r in &rows {
            println!(
                "{:>5} {:>9.4} {:>9.4} {:>9.4} {:>9.3} {:>9.3} {:>10.1}",
                r.layer, r.pq_index, r.outlier_ratio, r.block_influence, r.act_norm_mean, r.act_norm_max, r.act_norm_max_over_median
            );
        }
        println!("calibration: {calib_desc}");
        print_peak_memory();
        if let Some(dir) = &report {
            println!("report: {}", dir.join("index.html").display());
        }
    }
    Ok(())
}

use pipeline_cmd::print_peak_memory;
