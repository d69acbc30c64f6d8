//! torch's CPU random generator (`torch.Generator("cpu").manual_seed(seed)`) and its `randn`, so a seed
//! gives the same initial latents (and the same Euler-ancestral noise) as diffusers.
//!
//! Rules, confirmed against torch 2.15 on x86-64 (see the tests at the bottom):
//! * The engine is the standard 32-bit mt19937, seeded with the LOW 32 bits of the u64 seed
//!   (`manual_seed(2**32 + 7)` draws what `manual_seed(7)` draws; 2⁶⁴−1 acts as 2³²−1).
//! * float32 `randn(n)` with n ≥ 16 (contiguous): every slot first gets a uniform
//!   u = (next_u32 & 0xFFFFFF)·2⁻²⁴; then each block of 16 is Box–Muller transformed in place:
//!   for j < 8, r = √(−2·ln(1 − u[j])), θ = 2π·u[j+8] (float32 product), out[j] = r·cos θ,
//!   out[j+8] = r·sin θ. If n % 16 ≠ 0 the LAST 16 slots are drawn again (16 fresh uniforms) and
//!   transformed again, overwriting the tail of the previous blocks. torch evaluates log/sin/cos with
//!   vectorised approximations (Sleef on AVX-512 builds, avx_mathfun on AVX2), so values agree to one
//!   float32 ulp of the output (≤ 4.8e-7 absolute for |x| < 5), not bit for bit.
//! * n < 16 takes torch's serial path, `at::normal_distribution<double>` cast to float32: a uniform
//!   double is u = (random64 & (2⁵³−1))·2⁻⁵³ where random64 = (first_u32 << 32) | second_u32; each
//!   NEW pair draws u1 then u2, r = √(−2·log1p(−u2)), θ = 2π·u1, returns r·cos θ and keeps r·sin θ
//!   in the generator as a cached "next normal", which the next serial draw returns first, even
//!   across `randn` calls (a ≥16 draw in between neither uses nor clears it). Bit-exact with torch.

/// mt19937 + the cached second Box–Muller value of torch's `CPUGeneratorImpl`.
#[derive(Clone)]
pub struct TorchGenerator {
    state: Box<[u32; N]>,
    index: usize,
    next_double_normal: Option<f64>,
}

const N: usize = 624;
const M: usize = 397;

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("index", &self.index)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// Same stream as `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = seed as u32; // torch keeps only the low 32 bits
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        TorchGenerator {
            state,
            index: N,
            next_double_normal: None,
        }
    }

    /// The next raw 32-bit output of mt19937 (torch's `random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// torch's `random64()`: two 32-bit draws, the first one in the high half.
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits of `random64()`.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `at::normal_distribution<double>(0, 1)`, including the cached second value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=g, dtype=torch.float32)` (any shape with n elements, in
    /// row-major order), continuing this generator's stream.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for slot in tail.iter_mut() {
                *slot = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// torch's `normal_fill_16` (mean 0, std 1) on 16 uniforms, in place.
fn box_muller_16(data: &mut [f32]) {
    const TWO_PI: f32 = 2.0 * std::f32::consts::PI;
    for j in 0..8 {
        let u1 = 1.0 - data[j]; // [0, 1) → (0, 1] for the log
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = TWO_PI * u2;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Values printed by torch 2.15 (`/work/venv-fix/bin/python`):
    /// `torch.empty(4).uniform_(0, 1, generator=torch.Generator().manual_seed(s))`.
    #[test]
    fn uniform_stream_and_seed_truncation() {
        let cases: [(u64, [f32; 4]); 4] = [
            (0, [0.496_256_6, 0.768_221_8, 0.088_477_43, 0.132_030_49]),
            (42, [0.882_269_26, 0.915_003_96, 0.382_863_76, 0.959_305_64]),
            (
                4_294_967_296 + 7,
                [0.534_922_54, 0.198_803_19, 0.659_211_7, 0.656_890_3],
            ),
            (
                u64::MAX,
                [0.993_799_4, 0.571_306_35, 0.570_008_04, 0.049_503_744],
            ),
        ];
        for (seed, want) in cases {
            let mut g = TorchGenerator::new(seed);
            let got: Vec<f32> = (0..4).map(|_| g.uniform_f32()).collect();
            assert_eq!(got, want, "seed {seed}");
        }
        let mut a = TorchGenerator::new(4_294_967_296 + 7);
        let mut b = TorchGenerator::new(7);
        assert_eq!(a.randn(40), b.randn(40));
    }

    /// torch.randn(n, generator=torch.Generator().manual_seed(1)) for small n, called in sequence on
    /// one generator: [3], then [5], then [16], then [3] (the cached sin value crosses the ≥16 call).
    #[test]
    fn small_path_and_cache_match_torch() {
        let mut g = TorchGenerator::new(1);
        let a = g.randn(3);
        let b = g.randn(5);
        let c = g.randn(16);
        let d = g.randn(3);
        // Printed by torch 2.15 with `repr(float(x))`.
        let want_a = [0.661_352_16f32, 0.266_924_1, 0.061_677_26];
        let want_b = [
            0.621_317_3f32,
            -0.451_905_97,
            -0.166_130_23,
            -1.522_768_5,
            0.381_683_92,
        ];
        let want_c = [
            -0.696_972_4f32,
            -1.160_761_5,
            0.699_542_4,
            0.199_081_63,
            0.865_692_4,
            0.244_403_9,
            -0.662_911_36,
            0.807_308_24,
            1.101_680_6,
            -0.175_936_04,
            -2.245_557_8,
            -1.446_458,
            0.061_155_28,
            -0.617_744_45,
            -0.798_069_8,
            -0.131_623_21,
        ];
        let want_d = [-0.421_195_15f32, -0.510_7, -1.572_665_2];
        assert_eq!(a, want_a, "serial path is bit-exact");
        assert_eq!(b, want_b, "serial path is bit-exact");
        assert_eq!(d, want_d, "cached value survives a >=16 draw");
        for (x, y) in c.iter().zip(want_c) {
            assert!((x - y).abs() <= 1e-6, "{c:?} vs {want_c:?}");
        }
    }

    /// Long streams that cross mt19937's 624-word regeneration several times (torch 2.15 values):
    /// `torch.randn(2000, generator=manual_seed(3))`, and 50 calls of `randn(15)` on one generator.
    #[test]
    fn long_streams_match_torch() {
        let a = TorchGenerator::new(3).randn(2000);
        let picks = [
            (0, -0.076_644_294f32),
            (623, -0.331_637_1),
            (624, -0.519_167_3),
            (1247, -0.908_819_2),
            (1248, -2.017_830_1),
            (1999, 1.185_443_6),
        ];
        for (i, want) in picks {
            assert!((a[i] - want).abs() <= 1e-6, "[{i}] {} vs {want}", a[i]);
        }
        let sum: f64 = a.iter().map(|&x| x as f64).sum();
        assert!((sum - -80.713_004_057_121).abs() < 1e-4, "sum {sum}");

        let mut g = TorchGenerator::new(3);
        let b: Vec<f32> = (0..50).flat_map(|_| g.randn(15)).collect();
        assert_eq!(b[0], 0.803_276_06);
        assert_eq!(b[400], -0.175_844_28);
        assert_eq!(b[749], 0.036_776_237);
        let sum: f64 = b.iter().map(|&x| x as f64).sum();
        assert!((sum - -37.643_025_087_425_485).abs() < 1e-9, "sum {sum}");
    }

    /// (name, shape, values) of every tensor in a safetensors file.
    type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

    fn read_fixture(path: &Path) -> Option<Tensors> {
        let bytes = std::fs::read(path).ok()?;
        let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
        let mut out = Vec::new();
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            out.push((name, view.shape().to_vec(), data));
        }
        Some(out)
    }

    /// Every latent in tests/fixtures/reference/latents.safetensors (torch.randn of [1, 4, h, w]
    /// with a fresh generator per seed, plus `seed42_twice_8x8`, the second 8×8 draw of one
    /// generator) within 1e-6 absolute.
    #[test]
    fn latents_fixture_matches_torch() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference/latents.safetensors");
        let tensors = read_fixture(&path).expect("tests/fixtures/reference/latents.safetensors");
        assert!(tensors.len() >= 25, "fixture has {} tensors", tensors.len());
        let mut worst = 0f32;
        for (name, shape, want) in &tensors {
            let n: usize = shape.iter().product();
            let got = if name == "seed42_twice_8x8" {
                let mut g = TorchGenerator::new(42);
                g.randn(n);
                g.randn(n)
            } else {
                let rest = name
                    .strip_prefix("seed")
                    .expect("latent name seed{seed}_{h}x{w}");
                let (seed, _) = rest
                    .split_once('_')
                    .expect("latent name seed{seed}_{h}x{w}");
                TorchGenerator::new(seed.parse().expect("seed")).randn(n)
            };
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                let d = (a - b).abs();
                worst = worst.max(d);
                assert!(d <= 1e-6, "{name}[{i}]: ours {a}, torch {b}");
            }
            if n < 16 {
                assert_eq!(&got, want, "{name}: the serial path is bit-exact");
            }
        }
        eprintln!("latents: max |ours − torch| = {worst:.3e}");
    }
}
