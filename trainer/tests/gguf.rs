//! The GGUF reader: block decoding against values computed by hand from the format's definition,
//! and clear errors for truncated, corrupted or unsupported files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cohort_trainer::gguf::quant::dequantize;
use cohort_trainer::gguf::write::GgufWriter;
use cohort_trainer::gguf::{GgmlType, GgufErrorKind, GgufFile, Value};
use common::temp_gguf;
use half::f16;

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn decode(ty: GgmlType, block: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; ty.block_elems()];
    dequantize(ty, block, &mut out);
    out
}

#[test]
fn q4_0_low_nibble_is_element_j_and_high_nibble_element_j_plus_16() {
    // d = 0.5; byte j = (j+1 mod 16) | (15 - j) << 4.
    let mut block = h(0.5).to_vec();
    block.extend((0..16u8).map(|j| ((j + 1) % 16) | ((15 - j) << 4)));
    let got = decode(GgmlType::Q4_0, &block);
    assert_eq!(block.len(), 18);
    // Element 0: low nibble of byte 0 = 1 -> 0.5 * (1 - 8) = -3.5. Element 16: high nibble of
    // byte 0 = 15 -> 0.5 * 7 = 3.5. Element 15: low nibble of byte 15 = 0 -> -4. Element 31:
    // high nibble of byte 15 = 0 -> -4.
    assert_eq!((got[0], got[16], got[15], got[31]), (-3.5, 3.5, -4.0, -4.0));
    assert_eq!((got[1], got[17]), (-3.0, 3.0));
}

#[test]
fn q4_1_adds_the_minimum() {
    // d = 0.25, m = -1; byte j = j | (15 - j) << 4.
    let mut block = h(0.25).to_vec();
    block.extend_from_slice(&h(-1.0));
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = decode(GgmlType::Q4_1, &block);
    // x = d*q + m: element 3 -> 0.25*3 - 1 = -0.25; element 19 (high nibble of byte 3 = 12) -> 2.
    assert_eq!((got[0], got[3], got[19], got[31]), (-1.0, -0.25, 2.0, -1.0));
    assert_eq!(got[16], 0.25 * 15.0 - 1.0);
}

#[test]
fn q8_0_is_signed_bytes_times_d() {
    let mut block = h(0.125).to_vec();
    block.extend((0..32i8).map(|j| (j * 4 - 64) as u8));
    let got = decode(GgmlType::Q8_0, &block);
    assert_eq!((got[0], got[16], got[31]), (-8.0, 0.0, 7.5));
}

#[test]
fn q4_k_six_bit_scales_and_mins() {
    // d = 1, dmin = 0.5. Sub-block scales 1..=8, mins 8..=1 (6-bit packing of ggml's
    // get_scale_min_k4): j < 4: scale = s[j] & 63, min = s[j+4] & 63; j >= 4: scale =
    // (s[j+4] & 15) | (s[j-4] >> 6) << 4, min = (s[j+4] >> 4) | (s[j] >> 6) << 4.
    // With values below 16 the high bits are zero: s[0..4] = 1..=4, s[4..8] = mins 8,7,6,5,
    // s[8..12] = scale (5..=8) | min (4..=1) << 4.
    let mut block = h(1.0).to_vec();
    block.extend_from_slice(&h(0.5));
    block.extend_from_slice(&[
        1,
        2,
        3,
        4,
        8,
        7,
        6,
        5,
        5 | 4 << 4,
        6 | 3 << 4,
        7 | 2 << 4,
        8 | 1 << 4,
    ]);
    // qs: 128 bytes; 64-element chunk c uses bytes 32c..32c+32, low nibbles for the first 32
    // elements (sub-block 2c), high nibbles for the next 32 (sub-block 2c+1). Every byte = 0x3A:
    // low nibble 10, high nibble 3.
    block.extend(std::iter::repeat_n(0x3Au8, 128));
    assert_eq!(block.len(), 144);
    let got = decode(GgmlType::Q4K, &block);
    // Element 0: sub-block 0, scale 1, min 8: 1*1*10 - 0.5*8 = 6.
    assert_eq!(got[0], 6.0);
    // Element 32: sub-block 1, scale 2, min 7: 2*3 - 3.5 = 2.5.
    assert_eq!(got[32], 2.5);
    // Element 200: sub-block 6 (low nibbles of chunk 3), scale 7, min 2: 7*10 - 1 = 69.
    assert_eq!(got[200], 69.0);
    // Element 255: sub-block 7, scale 8, min 1: 8*3 - 0.5 = 23.5.
    assert_eq!(got[255], 23.5);
}

#[test]
fn q6_k_low_and_high_bits_and_signed_scales() {
    // ql: 128 bytes, qh: 64 bytes, scales: 16 x i8, d: f16 at the end.
    let mut block = vec![0u8; 210];
    // Element 0: q = ql[0] low | (qh[0] bits 0-1) << 4. Make it 5 | 2 << 4 = 37 -> 37 - 32 = 5.
    block[0] = 0x05;
    block[128] = 0b10;
    // Element 64 (third quarter of the first half): ql[0] high nibble | qh[0] bits 4-5.
    // ql[0] = 0x05 | 0xF0 -> 15; qh[0] bits 4-5 = 3 -> 15 | 48 = 63 -> 31.
    block[0] |= 0xF0;
    block[128] |= 0b11 << 4;
    // Element 160 (second half, second quarter, l = 0): ql[64 + 32] low | qh[32] bits 2-3.
    block[96] = 0x01; // 1
    block[160] = 0b01 << 2; // | 1 << 4 = 17 -> -15
    // Scales: element e uses scale e / 16: 0 -> sc[0], 64 -> sc[4], 160 -> sc[10].
    block[192] = 2;
    block[196] = (-3i8) as u8;
    block[202] = 4;
    block[208..210].copy_from_slice(&h(0.5));
    let got = decode(GgmlType::Q6K, &block);
    assert_eq!(got[0], 0.5 * 2.0 * 5.0);
    assert_eq!(got[64], 0.5 * -3.0 * 31.0);
    assert_eq!(got[160], 0.5 * 4.0 * -15.0);
    // Everything else in sub-block 0 is q = 0 -> -32.
    assert_eq!(got[1], 0.5 * 2.0 * -32.0);
}

#[test]
fn float_types_decode_and_every_type_round_trips_through_its_quantizer() {
    assert_eq!(decode(GgmlType::F16, &h(-2.5)), vec![-2.5]);
    assert_eq!(
        decode(GgmlType::BF16, &half::bf16::from_f32(3.0).to_le_bytes()),
        vec![3.0]
    );
    let values: Vec<f32> = (0..512)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    for ty in GgmlType::ALL {
        let mut bytes = Vec::new();
        cohort_trainer::gguf::quant::quantize(ty, &values, &mut bytes);
        assert_eq!(Some(bytes.len() as u64), ty.bytes_for(512));
        let mut back = vec![0f32; 512];
        dequantize(ty, &bytes, &mut back);
        let err = values
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let bound = match ty {
            GgmlType::F32 => 0.0,
            GgmlType::F16 | GgmlType::BF16 => 0.01,
            GgmlType::Q8_0 | GgmlType::Q6K => 0.05,
            _ => 0.25,
        };
        assert!(err <= bound, "{ty}: max error {err}");
    }
}

fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("general.alignment", Value::U32(32))
        .metadata(
            "some.list",
            Value::Array(vec![Value::I32(-1), Value::I32(2)]),
        );
    w.tensor_f32("a", &[32, 2], GgmlType::Q8_0, &[0.5; 64]);
    w.tensor_f32("b", &[4], GgmlType::F32, &[1.0, 2.0, 3.0, 4.0]);
    w.to_bytes()
}

#[test]
fn metadata_and_tensors_read_back() {
    let (_d, path) = temp_gguf(&small_file());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_int_array("some.list").unwrap(), vec![-1, 2]);
    assert_eq!(f.tensor_f32("b").unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(f.tensor("a").unwrap().rows_cols(), (2, 32));
    let err = f.get_u64("general.architecture").unwrap_err().to_string();
    assert!(
        err.contains("general.architecture") && err.contains("string"),
        "{err}"
    );
    let err = f.tensor("nope").unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("\"nope\""),
        "{err}"
    );
}

fn open_err(bytes: &[u8]) -> (String, GgufErrorKind) {
    let (_d, path) = temp_gguf(bytes);
    let err = GgufFile::open(&path).unwrap_err();
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "the error names the file: {err}"
    );
    (err.to_string(), err.kind)
}

#[test]
fn every_truncation_is_an_error_that_names_what_was_cut() {
    let bytes = small_file();
    // The file ends with tensor "b" (16 bytes of f32) padded to 32: every cut before the end of
    // b's data must fail, never panic; cutting only the final padding leaves a valid file.
    let data_end = bytes.len() - 16;
    let (_d, path) = temp_gguf(&bytes[..data_end]);
    assert!(GgufFile::open(&path).is_ok());
    for cut in 0..data_end {
        let (msg, _) = open_err(&bytes[..cut]);
        assert!(
            msg.contains("truncated") || msg.contains("outside") || msg.contains("magic"),
            "cut at {cut}: {msg}"
        );
    }
}

#[test]
fn corrupt_and_unsupported_files_are_refused_with_a_reason() {
    let bytes = small_file();
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(matches!(open_err(&bad).1, GgufErrorKind::BadMagic(_)));
    let mut bad = bytes.clone();
    bad[4] = 1;
    assert!(matches!(
        open_err(&bad).1,
        GgufErrorKind::UnsupportedVersion(1)
    ));
    // The tensor type of "a": find its index entry after the name and patch the type to Q5_K (13).
    let pos = bytes
        .windows(9)
        .position(|w| w == b"\x01\0\0\0\0\0\0\0a")
        .unwrap()
        + 9;
    let ty_at = pos + 4 + 2 * 8;
    let mut bad = bytes.clone();
    bad[ty_at] = 13;
    let (msg, kind) = open_err(&bad);
    assert!(
        matches!(kind, GgufErrorKind::UnsupportedTensorType { ty: 13, .. }),
        "{msg}"
    );
    assert!(msg.contains("\"a\""), "{msg}");
    // An absurd array length.
    let at = bytes.windows(9).position(|w| w == b"some.list").unwrap() + 9 + 4 + 4;
    let mut bad = bytes.clone();
    bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let (msg, _) = open_err(&bad);
    assert!(msg.contains("some.list"), "{msg}");
}
