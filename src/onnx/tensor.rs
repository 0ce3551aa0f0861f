//! Conversions between `TensorProto` and plain buffers.

use anyhow::{Context, Result, bail, ensure};

use super::{DataType, TensorProto};

/// Typed element buffer for building a `TensorProto` (always stored as little-endian `raw_data`).
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I16(Vec<i16>),
    U16(Vec<u16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    /// 4-bit codes (in -8..=7 / 0..=15), stored packed two per byte, the first in the low nibble.
    I4(Vec<i8>),
    U4(Vec<u8>),
}

impl TensorData {
    fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::U16(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I4(v) => v.len(),
            TensorData::U4(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }
}

/// Builds an initializer `name` of shape `dims` holding `data`.
///
/// Panics if `dims` does not describe `data.len()` elements: callers construct both together.
pub fn make_tensor(name: &str, dims: &[usize], data: TensorData) -> TensorProto {
    assert_eq!(
        dims.iter().product::<usize>(),
        data.len(),
        "tensor {name}: dims/data mismatch"
    );
    let (data_type, raw) = match data {
        TensorData::F32(v) => (
            DataType::Float,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorData::I8(v) => (DataType::Int8, v.iter().map(|&x| x as u8).collect()),
        TensorData::U8(v) => (DataType::Uint8, v),
        TensorData::I16(v) => (
            DataType::Int16,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorData::U16(v) => (
            DataType::Uint16,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorData::I32(v) => (
            DataType::Int32,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorData::I64(v) => (
            DataType::Int64,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorData::I4(v) => (DataType::Int4, pack_nibbles(v.iter().map(|&x| x as u8))),
        TensorData::U4(v) => (DataType::Uint4, pack_nibbles(v.into_iter())),
    };
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(data_type as i32),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// Two 4-bit values per byte, the first in the low nibble (ONNX's INT4/UINT4 layout).
fn pack_nibbles(values: impl Iterator<Item = u8>) -> Vec<u8> {
    let values: Vec<u8> = values.collect();
    values
        .chunks(2)
        .map(|pair| (pair[0] & 0x0f) | (pair.get(1).copied().unwrap_or(0) << 4))
        .collect()
}

/// The tensor's dimensions; an error for negative dimensions.
pub fn tensor_dims(t: &TensorProto) -> Result<Vec<usize>> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .with_context(|| format!("tensor '{}' has negative dimension {d}", t.name()))
        })
        .collect()
}

/// Number of elements the tensor's dimensions describe.
pub fn tensor_num_elements(t: &TensorProto) -> Result<usize> {
    Ok(tensor_dims(t)?.iter().product())
}

/// Name of an ONNX element type, for messages.
pub fn elem_type_name(data_type: i32) -> &'static str {
    DataType::try_from(data_type)
        .map(|d| d.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// The tensor's values as `f32` (from FLOAT or DOUBLE data, raw or typed fields).
///
/// External data must have been resolved by `read_model` before.
pub fn tensor_f32(t: &TensorProto) -> Result<Vec<f32>> {
    let values = match DataType::try_from(t.data_type()) {
        Ok(DataType::Float) => decode(t, &t.float_data, f32::from_le_bytes, |&x| x)?,
        Ok(DataType::Double) => decode(
            t,
            &t.double_data,
            |b| f64::from_le_bytes(b) as f32,
            |&x| x as f32,
        )?,
        _ => bail!(
            "tensor '{}' has element type {}, expected FLOAT",
            t.name(),
            elem_type_name(t.data_type())
        ),
    };
    checked_count(t, values)
}

/// The tensor's values as `i64` (from INT64 or INT32 data).
pub fn tensor_i64(t: &TensorProto) -> Result<Vec<i64>> {
    let values = match DataType::try_from(t.data_type()) {
        Ok(DataType::Int64) => decode(t, &t.int64_data, i64::from_le_bytes, |&x| x)?,
        Ok(DataType::Int32) => decode(
            t,
            &t.int32_data,
            |b| i32::from_le_bytes(b) as i64,
            |&x| x as i64,
        )?,
        _ => bail!(
            "tensor '{}' has element type {}, expected INT64",
            t.name(),
            elem_type_name(t.data_type())
        ),
    };
    checked_count(t, values)
}

/// The tensor's values as `i64`, from any integer element type (INT4 to INT64, signed or not; 4-bit
/// codes are unpacked, the first in the low nibble).
pub fn tensor_ints(t: &TensorProto) -> Result<Vec<i64>> {
    let typed32 = |f: fn(i32) -> i64| decode_with(t, &t.int32_data, f);
    let values = match DataType::try_from(t.data_type()) {
        Ok(DataType::Int64) | Ok(DataType::Int32) => return tensor_i64(t),
        Ok(DataType::Int8) => typed32(|x| x as i8 as i64)?,
        Ok(DataType::Uint8) => typed32(|x| x as u8 as i64)?,
        Ok(DataType::Int16) => decode(
            t,
            &t.int32_data,
            |b| i16::from_le_bytes(b) as i64,
            |&x| x as i16 as i64,
        )?,
        Ok(DataType::Uint16) => decode(
            t,
            &t.int32_data,
            |b| u16::from_le_bytes(b) as i64,
            |&x| x as u16 as i64,
        )?,
        Ok(DataType::Uint32) => decode(
            t,
            &t.uint64_data,
            |b| u32::from_le_bytes(b) as i64,
            |&x| x as u32 as i64,
        )?,
        Ok(dt @ (DataType::Int4 | DataType::Uint4)) => {
            let n = tensor_num_elements(t)?;
            let bytes: Vec<u8> = match &t.raw_data {
                Some(raw) if !raw.is_empty() || t.int32_data.is_empty() => raw.clone(),
                _ => t.int32_data.iter().map(|&x| x as u8).collect(),
            };
            ensure!(
                bytes.len() == n.div_ceil(2),
                "tensor '{}' holds {} bytes but its dims {:?} need {} packed 4-bit values",
                t.name(),
                bytes.len(),
                t.dims,
                n
            );
            let nibble = |k: usize| (bytes[k / 2] >> (4 * (k % 2))) & 0x0f;
            (0..n)
                .map(|k| match dt {
                    DataType::Int4 => ((nibble(k) << 4) as i8 >> 4) as i64,
                    _ => nibble(k) as i64,
                })
                .collect()
        }
        _ => bail!(
            "tensor '{}' has element type {}, expected an integer type",
            t.name(),
            elem_type_name(t.data_type())
        ),
    };
    checked_count(t, values)
}

/// One-byte integers: `raw_data` bytes when present, else the typed `int32_data` field.
fn decode_with(t: &TensorProto, typed: &[i32], f: fn(i32) -> i64) -> Result<Vec<i64>> {
    Ok(match &t.raw_data {
        Some(raw) if !raw.is_empty() || typed.is_empty() => {
            raw.iter().map(|&b| f(b as i32)).collect()
        }
        _ => typed.iter().map(|&x| f(x)).collect(),
    })
}

/// Values from `raw_data` (little-endian, `N` bytes each) when present, else from the typed field.
fn decode<const N: usize, S, T>(
    t: &TensorProto,
    typed: &[S],
    from_le: impl Fn([u8; N]) -> T,
    from_typed: impl Fn(&S) -> T,
) -> Result<Vec<T>> {
    Ok(match &t.raw_data {
        Some(raw) if !raw.is_empty() || typed.is_empty() => {
            le_chunks::<N>(raw, t)?.map(from_le).collect()
        }
        _ => typed.iter().map(from_typed).collect(),
    })
}

fn checked_count<T>(t: &TensorProto, values: Vec<T>) -> Result<Vec<T>> {
    let n = tensor_num_elements(t)?;
    ensure!(
        values.len() == n,
        "tensor '{}' holds {} values but its dims {:?} need {n}",
        t.name(),
        values.len(),
        t.dims
    );
    Ok(values)
}

fn le_chunks<'a, const N: usize>(
    raw: &'a [u8],
    t: &TensorProto,
) -> Result<impl Iterator<Item = [u8; N]> + 'a> {
    ensure!(
        raw.len().is_multiple_of(N),
        "tensor '{}' raw data of {} bytes is not a whole number of {N}-byte elements",
        t.name(),
        raw.len()
    );
    Ok(raw.chunks_exact(N).map(|c| {
        let mut b = [0u8; N];
        b.copy_from_slice(c);
        b
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_through_raw_data() {
        let t = make_tensor("w", &[2, 2], TensorData::F32(vec![1.0, -2.5, 0.0, 3.25]));
        assert_eq!(tensor_f32(&t).unwrap(), vec![1.0, -2.5, 0.0, 3.25]);
    }

    #[test]
    fn typed_float_data_is_read() {
        let t = TensorProto {
            name: Some("w".into()),
            dims: vec![3],
            data_type: Some(DataType::Float as i32),
            float_data: vec![1.0, 2.0, 3.0],
            ..Default::default()
        };
        assert_eq!(tensor_f32(&t).unwrap(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn wrong_element_count_names_the_tensor() {
        let mut t = make_tensor("w", &[2], TensorData::F32(vec![1.0, 2.0]));
        t.dims = vec![3];
        let err = tensor_f32(&t).unwrap_err().to_string();
        assert!(err.contains("'w'") && err.contains("need 3"), "{err}");
    }

    #[test]
    fn integer_tensors_of_every_width_decode() {
        let t = make_tensor("q", &[3], TensorData::I8(vec![-128, 0, 127]));
        assert_eq!(tensor_ints(&t).unwrap(), vec![-128, 0, 127]);
        let t = make_tensor("q", &[2], TensorData::U8(vec![0, 255]));
        assert_eq!(tensor_ints(&t).unwrap(), vec![0, 255]);
        let t = make_tensor("q", &[2], TensorData::I16(vec![-32768, 32767]));
        assert_eq!(tensor_ints(&t).unwrap(), vec![-32768, 32767]);
        let t = make_tensor("q", &[2], TensorData::U16(vec![0, 65535]));
        assert_eq!(tensor_ints(&t).unwrap(), vec![0, 65535]);
        let t = make_tensor("q", &[3], TensorData::I4(vec![-8, 7, -1]));
        assert_eq!(tensor_ints(&t).unwrap(), vec![-8, 7, -1]);
        let t = make_tensor("q", &[3], TensorData::U4(vec![0, 15, 9]));
        assert_eq!(tensor_ints(&t).unwrap(), vec![0, 15, 9]);
        let typed = TensorProto {
            name: Some("q".into()),
            dims: vec![2],
            data_type: Some(DataType::Int8 as i32),
            int32_data: vec![-3, 4],
            ..Default::default()
        };
        assert_eq!(tensor_ints(&typed).unwrap(), vec![-3, 4]);
        let mut short = make_tensor("q", &[3], TensorData::U4(vec![1, 2, 3]));
        short.dims = vec![5];
        assert!(tensor_ints(&short).unwrap_err().to_string().contains("'q'"));
    }

    #[test]
    fn int_tensor_is_refused_as_float() {
        let t = make_tensor("ids", &[1], TensorData::I64(vec![4]));
        assert!(tensor_f32(&t).unwrap_err().to_string().contains("INT64"));
        assert_eq!(tensor_i64(&t).unwrap(), vec![4]);
    }
}
