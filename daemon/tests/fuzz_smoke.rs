//! The fuzz targets (`rlaifd::fuzz_targets`: safetensors reader, control-protocol parser, config loader, image
//! decode path, chat-request parser) on stable Rust: a seeded mutation runner over the committed corpora in
//! `fuzz/corpus/<target>/` (bit flips, byte overwrites with boundary values, insertions, deletions, duplications,
//! truncations, splices between seeds). Any panic fails the test and leaves the input in
//! target/fuzz-crashes/. `RLAIFD_FUZZ_EXECS` sets the executions per target (default 20000). This is not
//! coverage-guided; `cargo +nightly fuzz run TARGET` in fuzz/ is.

use rlaifd::fuzz_targets::TARGETS;
use std::path::PathBuf;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const BOUNDARY: &[u8] =
    &[0x00, 0x01, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'[', b']', b',', b':', b'\n', b'\\', b'0', b'9', b'-', b'e'];
const TOKENS: &[&[u8]] = &[
    b"18446744073709551615",
    b"-1",
    b"1e308",
    b"NaN",
    b"null",
    b"\"\"",
    b"[]",
    b"{}",
    b"\xc3\x28",
    b"../../",
    b"'; DROP TABLE x; --",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = BOUNDARY[rng.below(BOUNDARY.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk: Vec<u8> = v[i..i + n].to_vec();
                let j = rng.below(len + 1);
                v.splice(j..j, chunk);
            }
            5 => v.truncate(rng.below(len + 1)),
            6 => {
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ => {
                // Little-endian u64 overwrite (safetensors' header length, image dimensions).
                if len >= 8 {
                    let i = rng.below(len - 7);
                    let val = [0u64, 1, u32::MAX as u64, u64::MAX, 1 << 40][rng.below(5)];
                    v[i..i + 8].copy_from_slice(&val.to_le_bytes());
                }
            }
        }
    }
    v
}

#[test]
fn fuzz_targets_survive_mutated_corpora() {
    let execs: usize = std::env::var("RLAIFD_FUZZ_EXECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let crashes = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
    // Panics are caught and reported below; keep the default hook from printing thousands of them.
    std::panic::set_hook(Box::new(|_| {}));
    let mut report = Vec::new();
    for (name, target) in TARGETS {
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(root.join(name))
            .unwrap_or_else(|_| panic!("fuzz/corpus/{name} is missing"))
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} is empty");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        let t0 = std::time::Instant::now();
        for i in 0..execs + seeds.len() {
            let input = if i < seeds.len() {
                seeds[i].clone()
            } else {
                let pick = rng.below(seeds.len());
                mutate(&mut rng, &seeds, &seeds[pick])
            };
            if std::panic::catch_unwind(|| target(&input)).is_err() {
                let _ = std::panic::take_hook();
                std::fs::create_dir_all(&crashes).unwrap();
                let path = crashes.join(format!("{name}-{i}"));
                std::fs::write(&path, &input).unwrap();
                panic!("fuzz target {name} panicked on input {} (saved to {})", i, path.display());
            }
        }
        report.push(format!("{name}: {} executions in {:.1} s", execs + seeds.len(), t0.elapsed().as_secs_f64()));
    }
    let _ = std::panic::take_hook();
    println!("{}", report.join("\n"));
}
