//! Reading and writing the `key = value` options of a recipe. Every value read remembers where it
//! stood in the recipe, so an error names the line; keys nobody read are reported as unknown.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::PathBuf;

use anyhow::{anyhow, Result};
use toml_edit::{Item, Table, Value};

/// The recipe's text and name, to turn byte offsets into line numbers.
pub struct Source<'a> {
    pub text: &'a str,
    pub name: &'a str,
}

impl Source<'_> {
    pub fn line_of(&self, span: Option<Range<usize>>) -> Option<usize> {
        span.map(|s| self.text[..s.start.min(self.text.len())].matches('\n').count() + 1)
    }

    /// `NAME line N: message` (or `NAME: message` when the place is unknown).
    pub fn error(&self, span: Option<Range<usize>>, msg: impl std::fmt::Display) -> anyhow::Error {
        match self.line_of(span) {
            Some(l) => anyhow!("{} line {l}: {msg}", self.name),
            None => anyhow!("{}: {msg}", self.name),
        }
    }
}

/// One table of a recipe being read: a step, or the top level.
pub struct Options<'a> {
    table: &'a Table,
    src: &'a Source<'a>,
    /// What the table is, for messages: "step 2 (prune)".
    what: String,
    used: BTreeSet<String>,
}

impl<'a> Options<'a> {
    pub fn new(table: &'a Table, src: &'a Source<'a>, what: impl Into<String>) -> Self {
        Self { table, src, what: what.into(), used: BTreeSet::new() }
    }

    /// Where `key` stands (its value, else its key, else the table).
    fn span_of(&self, key: &str) -> Option<Range<usize>> {
        self.table
            .get(key)
            .and_then(|i| i.span())
            .or_else(|| self.table.key(key).and_then(|k| k.span()))
            .or_else(|| self.table.span())
    }

    /// An error about `key`, placed at its line.
    pub fn error(&self, key: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        self.src.error(self.span_of(key), format!("{}: {key}: {msg}", self.what))
    }

    /// An error about the whole table, placed at its header.
    pub fn table_error(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        self.src.error(self.table.span(), format!("{}: {msg}", self.what))
    }

    /// `r`, its error (a library check of the value) placed at `key`'s line.
    pub fn at<T>(&self, key: &str, r: Result<T>) -> Result<T> {
        r.map_err(|e| self.error(key, format!("{e:#}")))
    }

    /// Marks `key` as read (a table the caller reads itself).
    pub fn touch(&mut self, key: &str) {
        self.used.insert(key.to_string());
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn value(&mut self, key: &str) -> Result<Option<&'a Value>> {
        let Some(item) = self.table.get(key) else { return Ok(None) };
        self.used.insert(key.to_string());
        match item {
            Item::Value(v) => Ok(Some(v)),
            _ => Err(self.error(key, "expected a value, found a table")),
        }
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.value().clone())),
            Some(v) => Err(self.error(key, format!("expected a string, found {}", v.type_name()))),
        }
    }

    /// A number (integer or float), finite.
    pub fn number(&mut self, key: &str) -> Result<Option<f64>> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::Float(f)) if f.value().is_finite() => Ok(Some(*f.value())),
            Some(Value::Float(f)) => Err(self.error(key, format!("expected a finite number, found {}", f.value()))),
            Some(Value::Integer(i)) => Ok(Some(*i.value() as f64)),
            Some(v) => Err(self.error(key, format!("expected a number, found {}", v.type_name()))),
        }
    }

    /// A whole number ≥ 0.
    pub fn natural(&mut self, key: &str) -> Result<Option<u64>> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::Integer(i)) if *i.value() >= 0 => Ok(Some(*i.value() as u64)),
            Some(Value::Integer(i)) => Err(self.error(key, format!("expected a whole number ≥ 0, found {}", i.value()))),
            Some(v) => Err(self.error(key, format!("expected a whole number, found {}", v.type_name()))),
        }
    }

    pub fn count(&mut self, key: &str) -> Result<Option<usize>> {
        self.natural(key).map(|v| v.map(|n| n.min(usize::MAX as u64) as usize))
    }

    pub fn boolean(&mut self, key: &str) -> Result<Option<bool>> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b.value())),
            Some(v) => Err(self.error(key, format!("expected true or false, found {}", v.type_name()))),
        }
    }

    /// One path or a list of them.
    pub fn paths(&mut self, key: &str) -> Result<Option<Vec<PathBuf>>> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(vec![PathBuf::from(s.value())])),
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for v in a.iter() {
                    match v {
                        Value::String(s) => out.push(PathBuf::from(s.value())),
                        o => return Err(self.error(key, format!("expected a list of paths, found {} in it", o.type_name()))),
                    }
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.error(key, format!("expected a path or a list of paths, found {}", v.type_name()))),
        }
    }

    /// A list of whole numbers ≥ 0.
    pub fn naturals(&mut self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for v in a.iter() {
                    match v {
                        Value::Integer(i) if *i.value() >= 0 => out.push(*i.value() as usize),
                        o => return Err(self.error(key, format!("expected a list of whole numbers ≥ 0, found {o} in it"))),
                    }
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.error(key, format!("expected a list of whole numbers, found {}", v.type_name()))),
        }
    }

    /// Fails on the first key nobody read, naming the ones `known` lists.
    pub fn finish(self, known: &[&str]) -> Result<()> {
        for (k, _) in self.table.iter() {
            if !self.used.contains(k) {
                let span = self.table.key(k).and_then(|k| k.span()).or_else(|| self.table.get(k).and_then(|i| i.span()));
                return Err(self.src.error(span, format!("{}: unknown option '{k}' (known: {})", self.what, known.join(", "))));
            }
        }
        Ok(())
    }
}

/// A recipe table being written: `key = value` lines in the order given.
#[derive(Default)]
pub struct Writer {
    pub text: String,
}

impl Writer {
    pub fn header(&mut self, h: &str) {
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(h);
        self.text.push('\n');
    }

    pub fn kv(&mut self, key: &str, v: impl Into<Value>) {
        let v: Value = v.into();
        // toml_edit keeps the decoration of a parsed value; a fresh one displays bare.
        let mut v = v;
        v.decor_mut().clear();
        self.text.push_str(&format!("{key} = {v}\n"));
    }

    pub fn path(&mut self, key: &str, p: &std::path::Path) {
        self.kv(key, p.to_string_lossy().into_owned());
    }

    pub fn paths(&mut self, key: &str, ps: &[PathBuf]) {
        let a: toml_edit::Array = ps.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        self.kv(key, a);
    }
}

/// An option value as a recipe writes it.
pub enum Opt {
    Str(String),
    Num(f64),
    Int(u64),
    Bool(bool),
    Ints(Vec<usize>),
    Paths(Vec<PathBuf>),
}

impl Opt {
    pub fn write(&self, w: &mut Writer, key: &str) {
        match self {
            Opt::Str(s) => w.kv(key, s.as_str()),
            Opt::Num(x) => w.kv(key, *x),
            Opt::Int(n) => w.kv(key, (*n).min(i64::MAX as u64) as i64),
            Opt::Bool(b) => w.kv(key, *b),
            Opt::Ints(v) => w.kv(key, v.iter().map(|&n| n as i64).collect::<toml_edit::Array>()),
            Opt::Paths(p) => w.paths(key, p),
        }
    }
}
