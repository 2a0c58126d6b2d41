#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rlaifd::fuzz_targets::chat(data));
