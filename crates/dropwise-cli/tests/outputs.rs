//! What the commands write: byte-identical files on reruns with the same inputs, seed and
//! threads; nothing left on a full disk; and no incomplete file under the final name when the
//! process is killed mid-write.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Every command that writes a model, with arguments that run it on the tiny model (CALIB is
/// a calibration text, OUT the output).
const WRITERS: &[(&str, &[&str])] = &[
    ("convert f32 GGUF", &["convert", "MODEL", "-o", "OUT.gguf"]),
    ("convert bf16 HF folder", &["convert", "MODEL", "--dtype", "bf16", "-o", "OUT"]),
    ("prune wanda 50 %", &["prune", "MODEL", "--method", "wanda", "--sparsity", "0.5", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "4", "--seed", "3", "-o", "OUT.gguf"]),
    ("prune sparsegpt 2:4", &["prune", "MODEL", "--method", "sparsegpt", "--pattern", "2:4", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "4", "-o", "OUT.gguf"]),
    ("prune wanda owl", &["prune", "MODEL", "--method", "wanda", "--sparsity", "0.5", "--allocation", "owl", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "4", "-o", "OUT.gguf"]),
    ("drop-layers additive", &["drop-layers", "MODEL", "--count", "1", "--metric", "additive", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "3", "-o", "OUT.gguf"]),
    ("drop-layers ppl mlp", &["drop-layers", "MODEL", "--count", "1", "--metric", "ppl", "--part", "mlp", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "3", "-o", "OUT.gguf"]),
    ("shrink taylor", &["shrink", "MODEL", "--heads", "0.25", "--neurons", "0.25", "--importance", "taylor", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "3", "-o", "OUT.gguf"]),
    ("shrink activation global", &["shrink", "MODEL", "--neurons", "0.5", "--allocation", "global", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "3", "-o", "OUT.gguf"]),
    ("drop-layers bi to HF", &["drop-layers", "MODEL", "--count", "1", "--metric", "bi", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "3", "-o", "OUT"]),
    ("quantize lim + imatrix", &["quantize", "MODEL", "--bpw", "6.0", "--imatrix", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "3", "-o", "OUT.gguf"]),
    ("quantize uniform Q4_0", &["quantize", "MODEL", "--uniform", "Q4_0", "-o", "OUT.gguf"]),
    ("recover kd", &["recover", "MODEL", "--teacher", "MODEL", "--train", "CALIB", "--seq-len", "16", "--tokens", "64", "--accumulate", "2", "-o", "OUT.gguf"]),
    ("recover lora kd+features", &["recover", "MODEL", "--teacher", "MODEL", "--train", "CALIB", "--seq-len", "16", "--tokens", "64", "--loss", "kd+features", "--params", "lora", "--lora-rank", "2", "--multi-sample-dropout", "2", "-o", "OUT.gguf"]),
];

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        valid_gguf(dir.path());
        std::fs::write(dir.path().join("calib.txt"), dropwise::testing::sample_text(6000)).unwrap();
        Fixture { dir }
    }

    fn args(&self, args: &[&str], out: &Path) -> Vec<OsString> {
        let p = self.dir.path();
        args.iter()
            .map(|a| match *a {
                "MODEL" => p.join("tiny.gguf").into_os_string(),
                "CALIB" => p.join("calib.txt").into_os_string(),
                "OUT" => out.to_path_buf().into_os_string(),
                "OUT.gguf" => out.with_extension("gguf").into_os_string(),
                a => OsString::from(a),
            })
            .collect()
    }
}

/// The bytes of a file, or of every file in a folder (by name), to compare two outputs.
fn contents(path: &Path) -> Vec<(String, Vec<u8>)> {
    if path.is_dir() {
        let mut v: Vec<(String, Vec<u8>)> =
            std::fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())).collect();
        v.sort();
        v
    } else {
        vec![(String::new(), std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))]
    }
}

fn output_of(args: &[&str], out: &Path) -> PathBuf {
    if args.contains(&"OUT.gguf") {
        out.with_extension("gguf")
    } else {
        out.to_path_buf()
    }
}

#[test]
fn every_writer_gives_byte_identical_files_on_a_rerun() {
    let fx = Fixture::new();
    let mut by_threads: Vec<Vec<Vec<(String, Vec<u8>)>>> = Vec::new();
    for threads in ["1", "2"] {
        let mut files = Vec::new();
        for (name, args) in WRITERS {
            let mut runs = Vec::new();
            for run in ["a", "b"] {
                let out = fx.dir.path().join(format!("{}-{threads}-{run}", name.replace([' ', '%', ':', '+'], "_")));
                let mut a = vec![OsString::from("--threads"), OsString::from(threads)];
                a.extend(fx.args(args, &out));
                let o = dropwise(&a);
                assert_eq!(o.code, Some(0), "{name} (threads {threads}): {}", o.stderr);
                runs.push(contents(&output_of(args, &out)));
            }
            assert!(runs[0] == runs[1], "{name} with {threads} threads wrote different bytes on a rerun");
            files.push(runs.pop().unwrap());
        }
        by_threads.push(files);
    }
    // Across thread counts the files may differ (README: what changes and why); shown, not asserted.
    for (i, (name, _)) in WRITERS.iter().enumerate() {
        eprintln!("{name}: 1 and 2 threads {}", if by_threads[0][i] == by_threads[1][i] { "identical" } else { "differ" });
    }
}

/// Runs `dropwise args` in a private mount namespace with a tmpfs of `kib` KiB at `dir`, and
/// returns its outcome and what the tmpfs held afterwards.
fn on_small_tmpfs(dir: &Path, kib: usize, args: &[OsString]) -> (Outcome, String) {
    std::fs::create_dir_all(dir).unwrap();
    let script = format!(
        "mount -t tmpfs -o size={kib}k tmpfs '{d}' || exit 98; \"$0\" \"$@\"; rc=$?; ls -A '{d}' > '{d}.listing'; exit $rc",
        d = dir.display()
    );
    let mut full = vec![OsString::from("-m"), OsString::from("sh"), OsString::from("-c"), OsString::from(script), OsString::from(env!("CARGO_BIN_EXE_dropwise"))];
    full.extend(args.iter().cloned());
    let o = run_limited(Path::new("/usr/bin/unshare"), &full);
    assert_ne!(o.code, Some(98), "cannot mount a tmpfs in a private namespace (needs unshare and mount rights): {}", o.stderr);
    let listing = std::fs::read_to_string(format!("{}.listing", dir.display())).unwrap_or_else(|_| panic!("no listing: {}", o.stderr));
    (o, listing)
}

#[test]
fn a_full_disk_gives_one_error_and_leaves_nothing() {
    let fx = Fixture::new();
    let model_bytes = std::fs::metadata(fx.dir.path().join("tiny.gguf")).unwrap().len() as usize;
    // Room for a tenth of the model: every writer runs out of space part way.
    let kib = (model_bytes / 10 / 1024).max(4);
    for (name, args) in WRITERS {
        let mount = fx.dir.path().join(format!("full-{}", name.replace([' ', '%', ':', '+'], "_")));
        let out = mount.join("out");
        let (o, listing) = on_small_tmpfs(&mount, kib, &fx.args(args, &out));
        assert_clean_error(&format!("{name} on a {kib} KiB disk"), &o, &["space"]);
        assert_eq!(listing.trim(), "", "{name}: a full disk left files behind");
    }
}

/// SIGKILL at random points while `convert` writes SmolLM2 in f32 (540 MB): the output name
/// holds either the previous file, whole, or the new one, whole; never a part.
#[test]
fn a_kill_mid_write_leaves_the_previous_file_or_the_whole_new_one() {
    let assets = std::env::var_os("DROPWISE_ASSETS").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let model = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.exists(), "assets missing: run `python3 scripts/fetch_assets.py`");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smol.gguf");
    let run = |dtype: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dropwise"));
        c.arg("convert").arg(&model).args(["--dtype", dtype, "-o"]).arg(&out).stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    // The new file, whole (and how long writing it takes), then the previous one in its place.
    let start = Instant::now();
    assert!(run("f32").status().unwrap().success());
    let full_time = start.elapsed();
    let new = std::fs::read(&out).unwrap();
    assert!(run("f16").status().unwrap().success());
    let previous = std::fs::read(&out).unwrap();
    assert_ne!(new.len(), previous.len());
    let mut rng = dropwise::data::SplitMix64(20);
    let (mut kept_previous, mut finished, mut swept) = (0, 0, 0);
    for kill in 0..20 {
        let at = Duration::from_secs_f64(full_time.as_secs_f64() * 1.1 * (rng.below(1000) as f64 / 1000.0));
        let mut child = run("f32").spawn().unwrap();
        std::thread::sleep(at);
        let _ = child.kill();
        let _ = child.wait();
        let now = std::fs::read(&out).unwrap();
        if now == previous {
            kept_previous += 1;
        } else if now == new {
            finished += 1;
            // Back to the previous file for the next kill.
            assert!(run("f16").status().unwrap().success());
        } else {
            panic!("kill {kill} at {at:?}: {} holds {} bytes, neither the previous file nor the whole new one", out.display(), now.len());
        }
        // A killed writer leaves its temporary file (a dot-name with its pid): the next writer
        // of the same output removes it, so at most one leftover exists at any time.
        let leftovers = std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().path() != out).count();
        assert!(leftovers <= 1, "kill {kill}: {leftovers} stale temporaries beside the output; writers do not sweep them");
        swept += usize::from(leftovers == 1);
    }
    // One finished run now leaves nothing but the output.
    assert!(run("f16").status().unwrap().success());
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("smol.gguf")], "a finished write left stale temporaries");
    eprintln!("{swept} kills left a temporary that the next write removed");
    eprintln!("20 kills: {kept_previous} left the previous file, {finished} the whole new one");
    assert!(kept_previous > 0, "no kill landed before the rename: the test did not test anything");
}
