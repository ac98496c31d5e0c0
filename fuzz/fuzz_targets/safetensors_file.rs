#![no_main]
//! libFuzzer target: dropwise::fuzzing::safetensors_file (see crates/dropwise/src/fuzzing.rs).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dropwise::fuzzing::prepare();
    dropwise::fuzzing::safetensors_file(data);
});
