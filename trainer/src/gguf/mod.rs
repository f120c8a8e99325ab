//! GGUF files: the header, the metadata, the tensor index and the tensors themselves.
//!
//! A [`GgufFile`] memory-maps the file, parses the header, every metadata key and the tensor
//! index eagerly (all bounds checked: a truncated or corrupted file fails here, naming the file
//! and the key or tensor), and hands out tensors on demand: raw block bytes for the quantized
//! kernels, or f32 values dequantized exactly as ggml defines them ([`quant`]).
//!
//! GGUF versions 2 and 3 are read (version 1 used 32-bit counts and is long gone). Dimensions are
//! kept in GGUF order: `dims[0]` is the contiguous one (the input features of a weight matrix).
//! [`write`](mod@write) produces files in the same format, for tests and for merged models.

pub mod quant;
pub mod write;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub use quant::GgmlType;

/// The file's magic number, `GGUF` in ASCII.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// What went wrong reading a GGUF file; always names the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct GgufError {
    pub path: PathBuf,
    pub kind: GgufErrorKind,
}

/// The specific problem in a [`GgufError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufErrorKind {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("truncated: {what} at byte {offset} runs past the end of the file ({len} bytes)")]
    Truncated { what: String, offset: u64, len: u64 },
    #[error("metadata key {key:?}: unknown value type {ty}")]
    BadValueType { key: String, ty: u32 },
    #[error("{what}: not valid UTF-8")]
    BadUtf8 { what: String },
    #[error("duplicate {what} {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error(
        "tensor {tensor:?}: ggml type {ty} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K are)"
    )]
    UnsupportedTensorType { tensor: String, ty: u32 },
    #[error("tensor {tensor:?}: {problem}")]
    BadTensor { tensor: String, problem: String },
    #[error(
        "tensor {tensor:?}: data at bytes {start}..{end} lies outside the tensor data ({len} bytes)"
    )]
    TensorOutOfBounds {
        tensor: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("metadata key {0:?} is missing")]
    MissingKey(String),
    #[error("metadata key {key:?} holds {found}, expected {expected}")]
    WrongKeyType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    WrongShape {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// GGUF's numeric type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// A short description of the value's type, for error messages.
    pub fn type_name(&self) -> String {
        match self {
            Value::Array(items) => format!(
                "an array of {} {}",
                items.len(),
                items
                    .first()
                    .map(|v| v.type_name())
                    .unwrap_or_else(|| "values".into())
            ),
            Value::U8(_) => "u8".into(),
            Value::I8(_) => "i8".into(),
            Value::U16(_) => "u16".into(),
            Value::I16(_) => "i16".into(),
            Value::U32(_) => "u32".into(),
            Value::I32(_) => "i32".into(),
            Value::F32(_) => "f32".into(),
            Value::Bool(_) => "bool".into(),
            Value::String(_) => "a string".into(),
            Value::U64(_) => "u64".into(),
            Value::I64(_) => "i64".into(),
            Value::F64(_) => "f64".into(),
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `f64`, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One entry of the tensor index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is contiguous.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the tensor data section.
    pub offset: u64,
    /// Bytes the tensor occupies.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elems(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Rows (the product of every dimension but the first) and columns (the first dimension).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1) as usize;
        let rows = self.dims.iter().skip(1).product::<u64>() as usize;
        (rows, cols)
    }
}

/// An opened GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
    data_start: u64,
}

impl GgufFile {
    /// Opens, maps and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let err = |kind| GgufError {
            path: path.clone(),
            kind,
        };
        let file = File::open(&path).map_err(|e| err(GgufErrorKind::Io(e)))?;
        // SAFETY: the map is read-only and private to this process. A file truncated or rewritten
        // by another process while mapped would fault or show new bytes; model files are written
        // once (atomically renamed into the cache) and never modified in place.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(GgufErrorKind::Io(e)))?;
        let parsed = parse(&map).map_err(err)?;
        Ok(GgufFile {
            path,
            map,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            by_name: parsed.by_name,
            data_start: parsed.data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata key and value, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// The tensor index, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    fn error(&self, kind: GgufErrorKind) -> GgufError {
        GgufError {
            path: self.path.clone(),
            kind,
        }
    }

    /// The value of a metadata key, or an error naming it.
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.error(GgufErrorKind::MissingKey(key.into())))
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &Value) -> GgufError {
        self.error(GgufErrorKind::WrongKeyType {
            key: key.into(),
            expected,
            found: v.type_name(),
        })
    }

    /// An unsigned integer key.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong(key, "an unsigned integer", v))
    }

    /// A float key (any numeric type is accepted).
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| self.wrong(key, "a number", v))
    }

    /// A string key.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string", v))
    }

    /// An array-of-strings key.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.get(key)?;
        match v {
            Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .ok_or_else(|| self.wrong(key, "an array of strings", v))
                })
                .collect(),
            _ => Err(self.wrong(key, "an array of strings", v)),
        }
    }

    /// An array-of-integers key, as i64.
    pub fn get_int_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        let v = self.get(key)?;
        match v {
            Value::Array(items) => items
                .iter()
                .map(|i| match *i {
                    Value::I8(x) => Ok(x.into()),
                    Value::I16(x) => Ok(x.into()),
                    Value::I32(x) => Ok(x.into()),
                    Value::I64(x) => Ok(x),
                    Value::U8(x) => Ok(x.into()),
                    Value::U16(x) => Ok(x.into()),
                    Value::U32(x) => Ok(x.into()),
                    _ => Err(self.wrong(key, "an array of integers", v)),
                })
                .collect(),
            _ => Err(self.wrong(key, "an array of integers", v)),
        }
    }

    /// The index entry of a tensor, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| self.error(GgufErrorKind::MissingTensor(name.into())))
    }

    /// Whether the file has a tensor of that name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// A tensor's raw bytes (whole blocks of its type), checked against `dims` when given.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8]), GgufError> {
        let info = self.tensor(name)?;
        let start = (self.data_start + info.offset) as usize;
        Ok((info, &self.map[start..start + info.size as usize]))
    }

    /// Checks a tensor's shape (GGUF order).
    pub fn expect_shape(&self, name: &str, dims: &[u64]) -> Result<&TensorInfo, GgufError> {
        let info = self.tensor(name)?;
        if info.dims != dims {
            return Err(self.error(GgufErrorKind::WrongShape {
                tensor: name.into(),
                expected: dims.to_vec(),
                found: info.dims.clone(),
            }));
        }
        Ok(info)
    }

    /// A tensor dequantized to f32, in GGUF element order (row-major over reversed dims).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let (info, bytes) = self.tensor_bytes(name)?;
        let mut out = vec![0f32; info.elems() as usize];
        quant::dequantize(info.ty, bytes, &mut out);
        Ok(out)
    }
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
    data_start: u64,
}

/// A bounds-checked little-endian cursor; every read names what it was reading.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufErrorKind> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(GgufErrorKind::Truncated {
                what: what(),
                offset: self.pos as u64,
                len: self.bytes.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(
        &mut self,
        what: &dyn Fn() -> String,
    ) -> Result<[u8; N], GgufErrorKind> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufErrorKind> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufErrorKind> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufErrorKind> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufErrorKind::Truncated {
                what: format!("{} ({len}-byte string)", what()),
                offset: self.pos as u64,
                len: self.bytes.len() as u64,
            });
        }
        let raw = self.take(len as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| GgufErrorKind::BadUtf8 { what: what() })
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufErrorKind> {
        let what = || format!("the value of metadata key {key:?}");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufErrorKind::Invalid(format!(
                        "metadata key {key:?}: bool byte {b} is neither 0 nor 1"
                    )));
                }
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth > 0 {
                    return Err(GgufErrorKind::Invalid(format!(
                        "metadata key {key:?}: nested arrays are not supported"
                    )));
                }
                let item_ty = self.u32(&what)?;
                let n = self.u64(&what)?;
                // Every element takes at least one byte: a count beyond the remaining bytes is a
                // corrupt file, not a reason to allocate.
                if n > self.remaining() {
                    return Err(GgufErrorKind::Truncated {
                        what: format!("metadata key {key:?} ({n}-element array)"),
                        offset: self.pos as u64,
                        len: self.bytes.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            ty => {
                return Err(GgufErrorKind::BadValueType {
                    key: key.into(),
                    ty,
                });
            }
        })
    }
}

fn parse(bytes: &[u8]) -> Result<Parsed, GgufErrorKind> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic: [u8; 4] = c.array(&|| "the magic number".into())?;
    if magic != MAGIC {
        return Err(GgufErrorKind::BadMagic(magic));
    }
    let version = c.u32(&|| "the version".into())?;
    if !(2..=3).contains(&version) {
        return Err(GgufErrorKind::UnsupportedVersion(version));
    }
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    let n_kv = c.u64(&|| "the metadata count".into())?;
    if n_kv > c.remaining() || n_tensors > c.remaining() {
        return Err(GgufErrorKind::Truncated {
            what: format!("{n_kv} metadata keys and {n_tensors} tensors"),
            offset: c.pos as u64,
            len: bytes.len() as u64,
        });
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let ty = c.u32(&|| format!("the type of metadata key {key:?}"))?;
        let value = c.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(GgufErrorKind::Duplicate {
                what: "metadata key",
                name: key,
            });
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(GgufErrorKind::Invalid(format!(
                    "metadata key \"general.alignment\" is {v:?}, not a power of two"
                )));
            }
        },
    };
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut by_name = BTreeMap::new();
    for i in 0..n_tensors {
        let name = c.string(&|| format!("the name of tensor #{i}"))?;
        let what = || format!("the index entry of tensor {name:?}");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(GgufErrorKind::BadTensor {
                tensor: name,
                problem: format!("{n_dims} dimensions (1 to 4 are allowed)"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let ty_id = c.u32(&what)?;
        let offset = c.u64(&what)?;
        let ty = GgmlType::from_id(ty_id).ok_or_else(|| GgufErrorKind::UnsupportedTensorType {
            tensor: name.clone(),
            ty: ty_id,
        })?;
        let elems = dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
        let bad = |problem: String| GgufErrorKind::BadTensor {
            tensor: name.clone(),
            problem,
        };
        let Some(elems) = elems else {
            return Err(bad(format!("dimensions {dims:?} overflow")));
        };
        if dims[0] % ty.block_elems() as u64 != 0 {
            return Err(bad(format!(
                "rows of {} elements are not whole {ty} blocks of {}",
                dims[0],
                ty.block_elems()
            )));
        }
        let size = ty
            .bytes_for(elems)
            .ok_or_else(|| bad(format!("{elems} elements are not whole {ty} blocks")))?;
        if offset % alignment != 0 {
            return Err(bad(format!(
                "offset {offset} is not aligned to {alignment}"
            )));
        }
        if by_name.insert(name.clone(), tensors.len()).is_some() {
            return Err(GgufErrorKind::Duplicate {
                what: "tensor",
                name,
            });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            size,
        });
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let data_len = (bytes.len() as u64).saturating_sub(data_start);
    for t in &tensors {
        let end = t.offset.saturating_add(t.size);
        if end > data_len {
            return Err(GgufErrorKind::TensorOutOfBounds {
                tensor: t.name.clone(),
                start: t.offset,
                end,
                len: data_len,
            });
        }
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        by_name,
        data_start,
    })
}
