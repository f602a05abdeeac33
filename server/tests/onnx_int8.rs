//! ONNX Runtime's int8 products through the server's own session settings
//! (`engine/onnx_session.rs`), on the fixtures of tests/data/make_int8_fixtures.py. In a process
//! of its own: the lib's unit tests must not load ONNX Runtime (runtime.rs).
use std::path::PathBuf;

use ort::value::Tensor;

use qserver::engine::onnx_session::{open_session, SessionSettings};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// saturating_matmul.onnx opened with `settings`, run on A = 255 and X = 1.0: its integer and
/// its fused outputs.
fn saturating_matmul(settings: &SessionSettings) -> (Vec<i32>, Vec<f32>) {
    let env = qserver::runtime::init(None).expect("ONNX Runtime (make runtime)");
    let mut session = open_session(&env, &fixture("saturating_matmul.onnx"), settings).unwrap();
    let a = Tensor::from_array(([1usize, 64], vec![255u8; 64])).unwrap();
    let x = Tensor::from_array(([1usize, 64], vec![1f32; 64])).unwrap();
    let outputs = session.run(ort::inputs!["A" => a, "X" => x]).unwrap();
    let (_, int) = outputs["Y_int"].try_extract_tensor::<i32>().unwrap();
    let (_, fused) = outputs["Y_float"].try_extract_tensor::<f32>().unwrap();
    (int.to_vec(), fused.to_vec())
}

/// tests/data/saturating_matmul.onnx (make_int8_fixtures.py says why): pairs of uint8 x
/// int8 products past 16 bits, through `MatMulInteger` and through `DynamicQuantizeMatMul`,
/// the fused op of our quantized encoders. Saturated (AVX2 or AVX-512BW without exact
/// products), they give 1048544 and about 4112.
#[test]
fn int8_products_are_exact_on_every_cpu() {
    let (exact, fused) = saturating_matmul(&SessionSettings::new(1));
    assert_eq!(exact, [255 * 127 * 64; 16]);
    for y in fused {
        assert!((y - 127.0 * 64.0).abs() < 0.01, "DynamicQuantizeMatMul gave {y}, not 8128");
    }
}

/// `--saturating-int8` reaches ONNX Runtime: on a CPU without VNNI the pairs saturate.
#[test]
fn saturating_int8_leaves_onnx_runtime_its_default() {
    let (y, _) = saturating_matmul(&SessionSettings { saturating_int8: true, ..SessionSettings::new(1) });
    #[cfg(target_arch = "x86_64")]
    let vnni = std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni");
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = true;
    if vnni {
        eprintln!("this CPU has VNNI: its int8 products are exact either way, nothing to check");
    } else {
        assert_eq!(y, [32767 * 32; 16], "pairs saturated into 16 bits");
    }
}

/// A file ONNX Runtime cannot give exact products still opens, and answers.
#[test]
fn a_shared_int8_weight_still_opens() {
    let env = qserver::runtime::init(None).expect("ONNX Runtime (make runtime)");
    let mut session = open_session(&env, &fixture("shared_int8_weights.onnx"), &SessionSettings::new(1)).unwrap();
    let a = Tensor::from_array(([1usize, 64], vec![1u8; 64])).unwrap();
    let outputs = session.run(ort::inputs!["A" => a]).unwrap();
    for name in ["Y_1", "Y_2"] {
        let (_, y) = outputs[name].try_extract_tensor::<i32>().unwrap();
        assert_eq!(y, &[127 * 64; 16][..], "{name}");
    }
}
