#![no_main]
// The decoder run lives in fuzz/harness (tern_fuzz_harness::TARGETS), shared with the
// corpus replay test.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = (tern_fuzz_harness::target("api_body").expect("target").run)(data);
});
