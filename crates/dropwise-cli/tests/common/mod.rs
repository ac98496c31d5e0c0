//! Shared by the command-line tests: running the binary under a memory limit and a deadline,
//! the clean-failure assertion, and tiny model fixtures.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dropwise::config::Arch;
use dropwise::formats::gguf::WriteDType;
use dropwise::testing;

pub const DEADLINE: Duration = Duration::from_secs(20);
/// Virtual memory limit in KiB for the binary (~3 GB).
pub const VMEM_KIB: u64 = 3_000_000;

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

pub struct Outcome {
    /// Exit code; `None` when killed by a signal (e.g. an abort after a failed allocation).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `dropwise args...` under `ulimit -v`, with a deadline; kills it and fails on timeout.
pub fn dropwise<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_limited(Path::new(env!("CARGO_BIN_EXE_dropwise")), args)
}

/// Runs `program args...` under `ulimit -v`, with a deadline; kills it and fails on timeout.
pub fn run_limited<I, S>(program: &Path, args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_os_string()).collect();
    let logs = tempfile::tempdir().unwrap();
    let out_path = logs.path().join("stdout");
    let err_path = logs.path().join("stderr");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {VMEM_KIB} || exit 97; exec \"$0\" \"$@\""))
        .arg(program)
        .args(&args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env("RAYON_NUM_THREADS", "2")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("cannot spawn sh");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            panic!("{} {args:?} did not finish within {DEADLINE:?}; stderr so far:\n{stderr}", program.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let o = Outcome { code: status.code(), stdout: read(&out_path), stderr: read(&err_path), elapsed };
    assert_ne!(o.code, Some(97), "the shell could not set ulimit -v");
    o
}

/// Asserts a clean one-line failure; every needle (case-insensitive) must appear in the line.
pub fn assert_clean_error(case: &str, o: &Outcome, needles: &[&str]) -> String {
    match check_clean_error(o, needles) {
        Ok(line) => {
            // Shown with --nocapture, to review what each case says.
            eprintln!("[{case}] {line}");
            line
        }
        Err(why) => panic!(
            "case {case}: exit {:?} after {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}\n=> {why}",
            o.code, o.elapsed, o.stderr, o.stdout
        ),
    }
}

/// The error line of a clean one-line failure, or what is wrong with it.
pub fn check_clean_error(o: &Outcome, needles: &[&str]) -> Result<String, String> {
    for bad in ["panicked", "internal error", "RUST_BACKTRACE", "memory allocation of", "stack backtrace"] {
        if o.stderr.contains(bad) {
            return Err(format!("stderr contains '{bad}'"));
        }
    }
    let code = o.code.ok_or("killed by a signal (abort after a failed allocation?)")?;
    if code == 0 {
        return Err("succeeded but should have failed".into());
    }
    if code == 101 {
        return Err("exit code 101 is a panic".into());
    }
    let line = o.stderr.strip_suffix('\n').unwrap_or(&o.stderr);
    if line.contains('\n') {
        return Err("stderr is more than one line".into());
    }
    if !line.starts_with("error:") {
        return Err("stderr does not start with 'error:'".into());
    }
    if line.len() >= 2000 {
        return Err(format!("error line is implausibly long ({} bytes)", line.len()));
    }
    let lower = line.to_lowercase();
    for n in needles {
        if !lower.contains(&n.to_lowercase()) {
            return Err(format!("error does not mention '{n}'"));
        }
    }
    Ok(line.to_string())
}

pub fn inspect(model: &Path) -> Outcome {
    dropwise([OsStr::new("inspect"), model.as_os_str()])
}

pub fn eval(model: &Path, data: &Path, seq_len: &str, windows: &str) -> Outcome {
    dropwise([
        OsStr::new("eval"),
        model.as_os_str(),
        OsStr::new("--data"),
        data.as_os_str(),
        OsStr::new("--seq-len"),
        OsStr::new(seq_len),
        OsStr::new("--windows"),
        OsStr::new(windows),
    ])
}

pub fn convert(input: &Path, output: &Path) -> Outcome {
    dropwise([OsStr::new("convert"), input.as_os_str(), OsStr::new("-o"), output.as_os_str()])
}

/// Inspect, eval and convert of a broken model must all fail cleanly.
pub fn assert_model_rejected(case: &str, model: &Path, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, testing::sample_text(4000)).unwrap();
    assert_clean_error(&format!("{case} (inspect)"), &inspect(model), needles);
    assert_clean_error(&format!("{case} (eval)"), &eval(model, &text, "16", "2"), needles);
    let out = dir.path().join("out.gguf");
    assert_clean_error(&format!("{case} (convert)"), &convert(model, &out), needles);
    assert!(!out.exists(), "case {case}: convert of a broken model wrote {}", out.display());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![OsString::from("text.txt")], "case {case}: convert left files behind");
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

pub fn tiny_model() -> dropwise::model::Llama {
    testing::tiny_model(testing::tiny_config(Arch::Llama), 7).unwrap()
}

/// A valid tiny llama GGUF.
pub fn valid_gguf(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    testing::write_tiny_gguf(&tiny_model(), &p, WriteDType::F32).unwrap();
    p
}

/// A valid tiny HF folder (config.json, tokenizer.json, model.safetensors).
pub fn valid_hf(dir: &Path) -> PathBuf {
    let p = dir.join("tiny-hf");
    testing::write_tiny_hf(&tiny_model(), &p, WriteDType::F32).unwrap();
    p
}

