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

use std::path::Path;

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

/// Builds a `weight.bin` in memory.
#[derive(Debug)]
pub struct BlobWriter {
    bytes: Vec<u8>,
    count: u32,
}

impl Default for BlobWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BlobWriter {
    pub fn new() -> Self {
        Self { bytes: vec![0; ALIGN], count: 0 }
    }

    /// Appends a blob of `dtype` holding `data` (`padding_bits`: bits of the last byte that
    /// are not part of the tensor, for sub-byte types; 0 otherwise). Returns the offset of
    /// its metadata record, which the program's `const` op names.
    pub fn add(&mut self, dtype: BlobDType, data: &[u8], padding_bits: u8) -> u64 {
        debug_assert_eq!(self.bytes.len() % ALIGN, 0);
        let metadata = self.bytes.len() as u64;
        let data_offset = metadata + ALIGN as u64;
        let mut record = [0u8; ALIGN];
        record[0..4].copy_from_slice(&SENTINEL.to_le_bytes());
        record[4..8].copy_from_slice(&(dtype as u32).to_le_bytes());
        record[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        record[16..24].copy_from_slice(&data_offset.to_le_bytes());
        record[24..32].copy_from_slice(&u64::from(padding_bits).to_le_bytes());
        self.bytes.extend_from_slice(&record);
        self.bytes.extend_from_slice(data);
        let padded = self.bytes.len().div_ceil(ALIGN) * ALIGN;
        self.bytes.resize(padded, 0);
        self.count += 1;
        metadata
    }

    /// Appends fp16 values (IEEE half, little-endian).
    pub fn add_f16(&mut self, values: &[half::f16]) -> u64 {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(BlobDType::Float16, &data, 0)
    }

    /// Appends fp32 values.
    pub fn add_f32(&mut self, values: &[f32]) -> u64 {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(BlobDType::Float32, &data, 0)
    }

    /// The file's bytes, header included.
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes[0..4].copy_from_slice(&self.count.to_le_bytes());
        self.bytes[4..8].copy_from_slice(&VERSION.to_le_bytes());
        self.bytes
    }

    /// Writes the file atomically (temporary file, then rename).
    pub fn write(self, path: &Path) -> std::io::Result<()> {
        crate::files::write_atomic(path, &self.finish())
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
        let first = w.add_f16(&[half::f16::from_f32(1.0), half::f16::from_f32(-2.0), half::f16::from_f32(0.5)]);
        let second = w.add_f32(&[1.5; 20]);
        let third = w.add(BlobDType::UInt4, &[0x21, 0x03], 4);
        let bytes = w.finish();
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
        w.add_f32(&[1.0; 4]);
        w.add_f32(&[2.0; 4]);
        let good = w.finish();
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
