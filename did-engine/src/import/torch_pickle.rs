//! `pytorch_model.bin`: the zip archive `torch.save` writes, read without
//! Python. `data.pkl` is a pickle of the state dict whose tensors point at raw
//! storages (`data/0`, `data/1`, …). The pickle is *interpreted*, never
//! executed: a small stack machine knows the opcodes `torch.save` emits and
//! exactly four callables (an ordered dict and torch's tensor and parameter
//! rebuilders); anything else is refused by name. Legacy (pre-1.6,
//! non-zip) files are refused with the way to convert them.

use crate::Error;
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::rc::Rc;

use super::weights::Tensor;

/// Element types of torch storages, by the class name `torch.save` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageType {
    F32,
    F64,
    F16,
    Bf16,
    I64,
    I32,
    U8,
}

impl StorageType {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "torch.FloatStorage" => Self::F32,
            "torch.DoubleStorage" => Self::F64,
            "torch.HalfStorage" => Self::F16,
            "torch.BFloat16Storage" => Self::Bf16,
            "torch.LongStorage" => Self::I64,
            "torch.IntStorage" => Self::I32,
            "torch.ByteStorage" | "torch.BoolStorage" => Self::U8,
            _ => return None,
        })
    }

    fn bytes(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::U8 => 1,
        }
    }

    fn value(self, b: &[u8]) -> f32 {
        match self {
            Self::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Self::F64 => {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }
            Self::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Self::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Self::I64 => {
                i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }
            Self::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            Self::U8 => f32::from(b[0]),
        }
    }
}

#[derive(Debug)]
struct StorageRef {
    key: String,
    kind: StorageType,
    numel: usize,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The values a state-dict pickle builds. Shared with `Rc` so that memo
/// lookups are cheap whatever the input nests.
#[derive(Debug, Clone)]
enum Value {
    None,
    /// Bools, floats and bytes: read past, never needed for a state dict.
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<Vec<Value>>),
    Dict(Rc<Vec<(Value, Value)>>),
    /// A class or function, `module.name`.
    Global(Rc<str>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

/// The pickle machine: a stack, the marks into it, and the memo.
struct Machine<'a> {
    code: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

type Result<T> = std::result::Result<T, Error>;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.code.len())
            .ok_or(Error::Import(
                "data.pkl ends in the middle of an instruction".into(),
            ))?;
        let s = &self.code[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn len_u64(&mut self) -> Result<usize> {
        let b = self.take(8)?;
        usize::try_from(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
        .map_err(|_| Error::Import("a length in data.pkl does not fit in memory".into()))
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.code[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(Error::Import("data.pkl: a GLOBAL name has no end".into()))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| Error::Import("data.pkl: a GLOBAL name is not UTF-8".into()))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> Result<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| Error::Import("data.pkl: a string is not UTF-8".into()))?;
        Ok(Value::Str(s.into()))
    }

    fn pop(&mut self) -> Result<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(Error::Import("data.pkl pops past a MARK".into()));
        }
        self.stack
            .pop()
            .ok_or_else(|| Error::Import("data.pkl pops an empty stack".into()))
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| Error::Import("data.pkl: the stack is empty".into()))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or(Error::Import("data.pkl: no MARK to pop to".into()))?;
        if m > self.stack.len() {
            return Err(Error::Import(
                "data.pkl: a MARK lies above the stack".into(),
            ));
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, key: u32) -> Result<Value> {
        self.memo.get(&key).cloned().ok_or_else(|| {
            Error::Import(format!(
                "data.pkl reads memo entry {key}, which was never written"
            ))
        })
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or(Error::Import("data.pkl memoizes an empty stack".into()))?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if items.len() % 2 != 0 {
            return Err(Error::Import(
                "data.pkl: SETITEMS with an odd number of values".into(),
            ));
        }
        match self.top()? {
            Value::Dict(d) => {
                let d = Rc::make_mut(d);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            other => Err(Error::Import(format!(
                "data.pkl sets items on {}",
                other.kind()
            ))),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(l) => {
                Rc::make_mut(l).extend(items);
                Ok(())
            }
            other => Err(Error::Import(format!(
                "data.pkl appends to {}",
                other.kind()
            ))),
        }
    }

    /// Runs to STOP and returns what it leaves.
    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(Error::Import(format!("data.pkl is pickle protocol {v}; up to 5 is read")));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b']' => self.stack.push(Value::List(Rc::new(Vec::new()))),
                b'}' => self.stack.push(Value::Dict(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(items)));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Rc::new(Vec::new())));
                    self.set_items(items)?;
                }
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Bool),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack
                        .push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return Err(Error::Import("data.pkl holds an integer wider than 64 bits".into()));
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= i64::from(byte) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // two's complement of n bytes
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                b'B' | b'C' => {
                    let n = if op == b'B' {
                        self.u32()? as usize
                    } else {
                        usize::from(self.u8()?)
                    };
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(format!("{module}.{name}").into()));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(format!("{m}.{n}").into()))
                        }
                        _ => return Err(Error::Import("data.pkl: STACK_GLOBAL without two strings".into())),
                    }
                }
                b'q' => {
                    let k = u32::from(self.u8()?);
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| Error::Import("data.pkl: memo overflow".into()))?;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = u32::from(self.u8()?);
                    let v = self.memo_get(k)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let k = self.u32()?;
                    let v = self.memo_get(k)?;
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = persistent_storage(&pid)?;
                    self.stack.push(Value::Storage(Rc::new(storage)));
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = reduce(&callable, &args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    self.pop()?; // BUILD: object state (a state dict's `_metadata`), not needed
                    self.top()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                other => {
                    return Err(Error::Import(format!(
                        "data.pkl uses pickle opcode 0x{other:02x} at byte {at}, which torch.save does not write"
                    )))
                }
            }
        }
    }
}

fn int(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) => {
            usize::try_from(*i).map_err(|_| Error::Import(format!("data.pkl: {what} is negative")))
        }
        other => Err(Error::Import(format!(
            "data.pkl: {what} is {}, not an int",
            other.kind()
        ))),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(|x| int(x, what)).collect(),
        other => Err(Error::Import(format!(
            "data.pkl: {what} is {}, not a tuple",
            other.kind()
        ))),
    }
}

/// `('storage', torch.FloatStorage, key, location, numel)`.
fn persistent_storage(pid: &Value) -> Result<StorageRef> {
    let Value::Tuple(t) = pid else {
        return Err(Error::Import(format!(
            "data.pkl: a persistent id is {}",
            pid.kind()
        )));
    };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(class), Value::Str(key), _location, numel]
            if &**tag == "storage" =>
        {
            let kind = StorageType::from_class(class).ok_or_else(|| {
                Error::Import(format!("data.pkl holds a {class}; float, half, bfloat16, double, long, int, byte and bool storages are read"))
            })?;
            Ok(StorageRef {
                key: key.to_string(),
                kind,
                numel: int(numel, "a storage size")?,
            })
        }
        _ => Err(Error::Import(
            "data.pkl: a persistent id that is not a torch storage".into(),
        )),
    }
}

/// The four callables a state dict needs; anything else is named and refused.
fn reduce(callable: &Value, args: &Value) -> Result<Value> {
    let Value::Global(name) = callable else {
        return Err(Error::Import(format!("data.pkl calls {}", callable.kind())));
    };
    let Value::Tuple(args) = args else {
        return Err(Error::Import(format!(
            "data.pkl calls {name} with {}",
            args.kind()
        )));
    };
    match &**name {
        "collections.OrderedDict" | "builtins.dict" if args.is_empty() => {
            Ok(Value::Dict(Rc::new(Vec::new())))
        }
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" if args.len() >= 4 => {
            let Value::Storage(storage) = &args[0] else {
                return Err(Error::Import(format!("data.pkl rebuilds a tensor from {}", args[0].kind())));
            };
            let offset = int(&args[1], "a storage offset")?;
            let shape = ints(&args[2], "a tensor size")?;
            let stride = ints(&args[3], "a tensor stride")?;
            if shape.len() != stride.len() {
                return Err(Error::Import("data.pkl: a tensor's size and stride differ in length".into()));
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: storage.clone(),
                offset,
                shape,
                stride,
            })))
        }
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state"
            if !args.is_empty() =>
        {
            match &args[0] {
                t @ Value::Tensor(_) => Ok(t.clone()),
                other => Err(Error::Import(format!("data.pkl makes a parameter of {}", other.kind()))),
            }
        }
        _ => Err(Error::Import(format!(
            "data.pkl builds a {name} object; a file of tensors (a state dict) is read, not arbitrary Python objects"
        ))),
    }
}

/// The tensors of a `torch.save`d state dict (or of a dict holding one under
/// `state_dict`), by name, as f32. Values that are not tensors are skipped.
pub fn read(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    if bytes.starts_with(&[0x80]) {
        return Err(Error::Import("this is a legacy (pre-1.6) torch.save file; load it in Python and save it again with `torch.save(sd, path)` or, better, `safetensors.torch.save_file(sd, path)`".into()));
    }
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| Error::Import(format!("not a PyTorch zip archive ({e})")))?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.to_string()))
        .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .min_by_key(|n| n.len())
        .ok_or(Error::Import(
            "the archive has no data.pkl: not a torch.save file".into(),
        ))?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let code = read_entry(&mut zip, &pkl_name, 1 << 30)?;
    let machine = Machine {
        code: &code,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let mut root = machine.run()?;
    if let Value::Dict(d) = &root {
        if let Some((_, inner @ Value::Dict(_))) = d
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if &**s == "state_dict"))
        {
            root = inner.clone();
        }
    }
    let Value::Dict(entries) = root else {
        return Err(Error::Import(format!(
            "data.pkl holds {}, not a state dict of tensors",
            root.kind()
        )));
    };
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::new();
    for (k, v) in entries.iter() {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
            continue;
        };
        let s = &t.storage;
        if !storages.contains_key(&s.key) {
            let want = s
                .numel
                .checked_mul(s.kind.bytes())
                .ok_or(Error::Import("data.pkl: a storage size overflows".into()))?;
            let data = read_entry(&mut zip, &format!("{prefix}data/{}", s.key), want)?;
            if data.len() != want {
                return Err(Error::Import(format!(
                    "storage {} of tensor {name} holds {} bytes; its header says {want}",
                    s.key,
                    data.len()
                )));
            }
            storages.insert(s.key.clone(), data);
        }
        let values = gather(name, t, &storages[&s.key])?;
        out.push((
            name.to_string(),
            Tensor {
                shape: t.shape.clone(),
                values,
            },
        ));
    }
    if out.is_empty() {
        return Err(Error::Import("data.pkl holds no tensors".into()));
    }
    Ok(out)
}

/// One zip entry, at most `limit` bytes (more is an error, not an allocation).
fn read_entry(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: usize,
) -> Result<Vec<u8>> {
    let entry = zip
        .by_name(name)
        .map_err(|e| Error::Import(format!("the archive has no {name} ({e})")))?;
    let mut data = Vec::new();
    entry
        .take(limit as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| Error::Import(format!("cannot read {name} from the archive ({e})")))?;
    if data.len() > limit {
        return Err(Error::Import(format!(
            "{name} is larger than its tensors say"
        )));
    }
    Ok(data)
}

/// A tensor's elements in row-major order, whatever its strides.
fn gather(name: &str, t: &TensorRef, storage: &[u8]) -> Result<Vec<f32>> {
    let kind = t.storage.kind;
    let size = kind.bytes();
    let count = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::Import(format!("tensor {name}: its size overflows")))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| {
            a.checked_add((d - 1).checked_mul(s)?)
        })
        .ok_or_else(|| Error::Import(format!("tensor {name}: its extent overflows")))?;
    if last >= t.storage.numel || count > t.storage.numel {
        return Err(Error::Import(format!(
            "tensor {name} (size {:?}, stride {:?}, offset {}) reaches past its storage of {} elements",
            t.shape, t.stride, t.offset, t.storage.numel
        )));
    }
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..count {
        let at: usize = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.push(kind.value(&storage[at * size..(at + 1) * size]));
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal torch.save archive: `{name: tensor}` over one f32 storage, written by hand.
    pub(crate) fn archive(pickle: &[u8], storage: &[f32]) -> Vec<u8> {
        use std::io::Write;
        let mut buf = Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file("archive/data.pkl", opts).unwrap();
        w.write_all(pickle).unwrap();
        w.start_file("archive/data/0", opts).unwrap();
        for v in storage {
            w.write_all(&v.to_le_bytes()).unwrap();
        }
        w.finish().unwrap();
        buf.into_inner()
    }

    /// `OrderedDict(w=_rebuild_tensor_v2(storage('0', numel), offset, size, stride, False, OrderedDict()))`.
    fn state_dict_pickle(numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)R(X\x01\x00\x00\x00w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK");
        p.push(numel);
        p.extend(b"tQK");
        p.push(offset);
        p.push(b'(');
        for &s in size {
            p.extend([b'K', s]);
        }
        p.extend(b"t(");
        for &s in stride {
            p.extend([b'K', s]);
        }
        p.extend(b"t\x89h\x00)RtRu.");
        p
    }

    #[test]
    fn a_strided_tensor_is_read_in_row_major_order() {
        let storage: Vec<f32> = (0..8).map(|i| i as f32).collect();
        // The transpose of a [2, 3] matrix stored from offset 1: stride (1, 3).
        let file = archive(&state_dict_pickle(8, 1, &[3, 2], &[1, 3]), &storage);
        let t = read(&file).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, "w");
        assert_eq!(t[0].1.shape, vec![3, 2]);
        assert_eq!(t[0].1.values, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    #[test]
    fn a_tensor_past_its_storage_is_an_error_naming_it() {
        let storage = [0.0f32; 4];
        let err = read(&archive(
            &state_dict_pickle(4, 1, &[2, 2], &[2, 1]),
            &storage,
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tensor w") && err.contains("past its storage"),
            "{err}"
        );
    }

    #[test]
    fn arbitrary_objects_are_refused_by_name() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let err = read(&archive(p, &[])).unwrap_err().to_string();
        assert!(err.contains("os.system"), "{err}");
    }

    #[test]
    fn a_legacy_file_and_a_non_archive_say_what_they_are() {
        assert!(read(b"\x80\x02\x8a\x0a")
            .unwrap_err()
            .to_string()
            .contains("legacy"));
        assert!(read(b"hello").unwrap_err().to_string().contains("zip"));
    }

    #[test]
    fn negative_long1_integers_are_sign_extended() {
        let m = Machine {
            code: b"\x8a\x01\xff.",
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        };
        assert!(matches!(m.run().unwrap(), Value::Int(-1)));
    }
}
