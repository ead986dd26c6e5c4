//! MIL blob storage: the `Data/com.apple.CoreML/weights/weight.bin` file of an ML Program
//! package, which holds every constant tensor too large to sit in the program itself.
//!
//! Format (version 2; facts from coremltools' `mlmodel/src/MILBlob/Blob/StorageFormat.hpp`
//! and `BlobDataType.hpp`, checked on a file coremltools 9.0 wrote; see
//! `shared/notes/coreml-export.md`), little-endian, every record 64-byte aligned:
//! - a 64-byte file header: `u32` blob count, `u32` version (2), 7 reserved `u64` (0);
//! - per blob, a 64-byte metadata record: `u32` sentinel `0xDEADBEEF`, `u32` data type,
//!   `u64` size in bytes, `u64` absolute offset of the data, `u64` padding in bits (for
//!   sub-byte types: bits unused in the last byte), 4 reserved `u64` (0); then the data,
//!   padded with zeros to the next 64-byte boundary.
//!
//! A program's `const` op refers to a blob by the offset of its **metadata record** (the
//! first blob's is 64, its data at 128).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Cursor, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Blob data types, as `BlobDataType.hpp` numbers them (not the MIL proto's `DataType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum BlobDType {
    Float16 = 1,
    Float32 = 2,
    UInt8 = 3,
    Int8 = 4,
    BFloat16 = 5,
    Int16 = 6,
    UInt16 = 7,
    Int4 = 8,
    UInt1 = 9,
    UInt2 = 10,
    UInt4 = 11,
    UInt3 = 12,
    UInt6 = 13,
    Int32 = 14,
    UInt32 = 15,
}

impl BlobDType {
    fn from_code(code: u32) -> Option<Self> {
        use BlobDType::*;
        Some(match code {
            1 => Float16,
            2 => Float32,
            3 => UInt8,
            4 => Int8,
            5 => BFloat16,
            6 => Int16,
            7 => UInt16,
            8 => Int4,
            9 => UInt1,
            10 => UInt2,
            11 => UInt4,
            12 => UInt3,
            13 => UInt6,
            14 => Int32,
            15 => UInt32,
            _ => return None,
        })
    }
}

/// The storage format version this module writes and reads.
pub const VERSION: u32 = 2;
/// Marks every metadata record.
pub const SENTINEL: u32 = 0xDEAD_BEEF;
const ALIGN: usize = 64;

/// Writes a `weight.bin` blob by blob into any seekable sink: memory ([`BlobWriter::new`])
/// or a file ([`BlobWriter::create`]), so an SD-1.5-size UNet streams to disk instead of
/// being held twice. Identical blobs (same type, padding and bytes, compared by SHA-256)
/// are stored once: the functions of a multifunction package share the base weights.
pub struct BlobWriter<W: Write + Seek = Cursor<Vec<u8>>> {
    sink: W,
    len: u64,
    count: u32,
    seen: HashMap<[u8; 32], u64>,
}

impl Default for BlobWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BlobWriter {
    /// A writer into memory.
    pub fn new() -> Self {
        Self::on(Cursor::new(Vec::new())).expect("writing to memory cannot fail")
    }

    /// The file's bytes, header included.
    pub fn into_bytes(self) -> Vec<u8> {
        self.finish().expect("writing to memory cannot fail").into_inner()
    }
}

impl BlobWriter<BufWriter<File>> {
    /// A writer into a new file at `path` (truncated if present).
    ///
    /// # Errors
    /// The I/O error of creating it.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Self::on(BufWriter::with_capacity(1 << 20, File::create(path)?))
    }
}

impl<W: Write + Seek> BlobWriter<W> {
    fn on(mut sink: W) -> std::io::Result<Self> {
        sink.write_all(&[0; ALIGN])?;
        Ok(Self { sink, len: ALIGN as u64, count: 0, seen: HashMap::new() })
    }

    /// Bytes written so far (header included).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Number of distinct blobs written so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Appends a blob of `dtype` holding `data` (`padding_bits`: bits of the last byte that
    /// are not part of the tensor, for sub-byte types; 0 otherwise), unless the same blob is
    /// already stored. Returns the offset of its metadata record, which the program's
    /// `const` op names.
    ///
    /// # Errors
    /// The sink's I/O error (a full disk).
    pub fn add(&mut self, dtype: BlobDType, data: &[u8], padding_bits: u8) -> std::io::Result<u64> {
        let mut hasher = Sha256::new();
        hasher.update([dtype as u8, padding_bits]);
        hasher.update(data);
        let key: [u8; 32] = hasher.finalize().into();
        if let Some(&offset) = self.seen.get(&key) {
            return Ok(offset);
        }
        let metadata = self.len;
        let data_offset = metadata + ALIGN as u64;
        let mut record = [0u8; ALIGN];
        record[0..4].copy_from_slice(&SENTINEL.to_le_bytes());
        record[4..8].copy_from_slice(&(dtype as u32).to_le_bytes());
        record[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        record[16..24].copy_from_slice(&data_offset.to_le_bytes());
        record[24..32].copy_from_slice(&u64::from(padding_bits).to_le_bytes());
        self.sink.write_all(&record)?;
        self.sink.write_all(data)?;
        let end = data_offset + data.len() as u64;
        let padded = end.div_ceil(ALIGN as u64) * ALIGN as u64;
        self.sink.write_all(&vec![0; (padded - end) as usize])?;
        self.len = padded;
        self.count += 1;
        self.seen.insert(key, metadata);
        Ok(metadata)
    }

    /// Appends fp16 values (IEEE half, little-endian).
    ///
    /// # Errors
    /// As [`BlobWriter::add`].
    pub fn add_f16(&mut self, values: &[half::f16]) -> std::io::Result<u64> {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(BlobDType::Float16, &data, 0)
    }

    /// Appends fp32 values.
    ///
    /// # Errors
    /// As [`BlobWriter::add`].
    pub fn add_f32(&mut self, values: &[f32]) -> std::io::Result<u64> {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(BlobDType::Float32, &data, 0)
    }

    /// Writes the header (blob count, version) and flushes; returns the sink.
    ///
    /// # Errors
    /// The sink's I/O error.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.sink.seek(SeekFrom::Start(0))?;
        self.sink.write_all(&self.count.to_le_bytes())?;
        self.sink.write_all(&VERSION.to_le_bytes())?;
        self.sink.seek(SeekFrom::End(0))?;
        self.sink.flush()?;
        Ok(self.sink)
    }
}

/// One blob as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Blob<'a> {
    /// Offset of its metadata record (what a `const` op names).
    pub offset: u64,
    pub dtype: BlobDType,
    pub padding_bits: u64,
    pub data: &'a [u8],
}

/// Why a `weight.bin` cannot be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BlobError {
    #[error("weight file too short for its header ({0} bytes)")]
    Short(usize),
    #[error("weight file has storage version {0}; version 2 is supported")]
    Version(u32),
    #[error("blob {index} at offset {offset}: {problem}")]
    Record { index: u32, offset: u64, problem: String },
}

/// Reads every blob of a `weight.bin`, checking sentinels, types and bounds.
///
/// # Errors
/// [`BlobError`] naming the blob and what is wrong with it.
pub fn read(bytes: &[u8]) -> Result<Vec<Blob<'_>>, BlobError> {
    if bytes.len() < ALIGN {
        return Err(BlobError::Short(bytes.len()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let (count, version) = (u32_at(0), u32_at(4));
    if version != VERSION {
        return Err(BlobError::Version(version));
    }
    let mut blobs = Vec::with_capacity(count as usize);
    let mut at = ALIGN;
    for index in 0..count {
        let bad = |problem: String| BlobError::Record { index, offset: at as u64, problem };
        if at + ALIGN > bytes.len() {
            return Err(bad("the metadata record is past the end of the file".into()));
        }
        if u32_at(at) != SENTINEL {
            return Err(bad(format!("no 0xDEADBEEF sentinel (found {:#010x})", u32_at(at))));
        }
        let dtype = BlobDType::from_code(u32_at(at + 4)).ok_or_else(|| bad(format!("unknown data type {}", u32_at(at + 4))))?;
        let (size, offset, padding_bits) = (u64_at(at + 8), u64_at(at + 16), u64_at(at + 24));
        let end = offset.checked_add(size).filter(|&e| e <= bytes.len() as u64).ok_or_else(|| bad(format!("data of {size} bytes at {offset} is past the end of the file")))?;
        if offset % ALIGN as u64 != 0 || offset < (at + ALIGN) as u64 {
            return Err(bad(format!("data offset {offset} is not the 64-byte aligned place after its record")));
        }
        blobs.push(Blob { offset: at as u64, dtype, padding_bits, data: &bytes[offset as usize..end as usize] });
        at = (end as usize).div_ceil(ALIGN) * ALIGN;
    }
    Ok(blobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_coremltools() {
        let mut w = BlobWriter::new();
        let first = w.add_f16(&[half::f16::from_f32(1.0), half::f16::from_f32(-2.0), half::f16::from_f32(0.5)]).unwrap();
        let second = w.add_f32(&[1.5; 20]).unwrap();
        let third = w.add(BlobDType::UInt4, &[0x21, 0x03], 4).unwrap();
        assert_eq!(w.add_f32(&[1.5; 20]).unwrap(), second, "an identical blob is stored once");
        let bytes = w.into_bytes();
        // The first record at 64 and its data at 128, as in a file coremltools wrote.
        assert_eq!((first, second, third), (64, 192, 384), "6 bytes of data pad to 64; 80 bytes to 128");
        assert_eq!(bytes.len(), 512);
        assert_eq!(&bytes[0..8], &[3, 0, 0, 0, 2, 0, 0, 0], "count 3, version 2");
        assert!(bytes[8..64].iter().all(|b| *b == 0), "reserved");
        assert_eq!(&bytes[64..68], &0xDEADBEEFu32.to_le_bytes());
        assert_eq!(&bytes[68..72], &1u32.to_le_bytes(), "Float16 = 1");
        assert_eq!(&bytes[72..80], &6u64.to_le_bytes(), "size in bytes");
        assert_eq!(&bytes[80..88], &128u64.to_le_bytes(), "absolute data offset");
        assert_eq!(&bytes[128..134], &[0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38], "1.0, -2.0, 0.5 as IEEE half");
        assert_eq!(&bytes[384 + 24..384 + 32], &4u64.to_le_bytes(), "padding bits of the sub-byte blob");

        let blobs = read(&bytes).unwrap();
        assert_eq!(blobs.iter().map(|b| (b.offset, b.dtype, b.data.len())).collect::<Vec<_>>(), vec![
            (64, BlobDType::Float16, 6),
            (192, BlobDType::Float32, 80),
            (384, BlobDType::UInt4, 2),
        ]);
        assert_eq!(f32::from_le_bytes(blobs[1].data[76..80].try_into().unwrap()), 1.5);
        assert_eq!(blobs[2].padding_bits, 4);
    }

    #[test]
    fn damaged_files_are_refused_naming_the_blob() {
        let mut w = BlobWriter::new();
        w.add_f32(&[1.0; 4]).unwrap();
        w.add_f32(&[2.0; 4]).unwrap();
        let good = w.into_bytes();
        assert_eq!(read(&good[..10]), Err(BlobError::Short(10)));
        let mut v = good.clone();
        v[4] = 1;
        assert_eq!(read(&v), Err(BlobError::Version(1)));
        // 16 bytes of data pad to 64: the second record is at 64 + 64 + 64.
        let mut s = good.clone();
        s[192] = 0;
        let e = read(&s).unwrap_err().to_string();
        assert!(e.starts_with("blob 1 at offset 192: no 0xDEADBEEF sentinel"), "{e}");
        let mut t = good.clone();
        t[192 + 8..192 + 16].copy_from_slice(&4096u64.to_le_bytes());
        assert!(read(&t).unwrap_err().to_string().contains("past the end of the file"));
        let mut d = good;
        d[68..72].copy_from_slice(&99u32.to_le_bytes());
        assert!(read(&d).unwrap_err().to_string().contains("unknown data type 99"));
    }
}
