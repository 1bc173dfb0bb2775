//! RoPE inverse frequencies, checked bit for bit against torch 2.15 + transformers 5.23.
//!
//! Expected values were produced with `/work/.venv-ref/bin/python` on x86 (AVX-512 capable):
//! `DiffusionGemmaTextRotaryEmbedding(config).{sliding,full}_attention_inv_freq` for the 26B-A4B
//! text config, printed as float32 bit patterns, and re-run with `ATEN_CPU_CAPABILITY=avx2` and
//! `=default` for the other kernels.

use dgemma_model::{RopeKind, RopeSpec, TorchCpuKernel};

/// Sliding layers: default RoPE, theta 10000, head_dim 256 (128 entries).
const SLIDING_256: [u32; 128] = [
    0x3f800000, 0x3f6e39f8, 0x3f5dafd7, 0x3f4e4bad, 0x3f3ff911, 0x3f32a506, 0x3f263de0, 0x3f1ab32b,
    0x3f0ff59a, 0x3f05f6ef, 0x3ef953cf, 0x3ee8045f, 0x3ed7e89b, 0x3ec8eb24, 0x3ebaf81b, 0x3eadfcff,
    0x3ea1e89b, 0x3e96aaea, 0x3e8c3504, 0x3e827909, 0x3e72d423, 0x3e61f835, 0x3e5247ed, 0x3e43ae7c,
    0x3e361887, 0x3e297409, 0x3e1db040, 0x3e12bd91, 0x3e088d77, 0x3dfe24e0, 0x3dec7fd6, 0x3ddc1466,
    0x3dcccccd, 0x3dbe94c6, 0x3db15978, 0x3da50956, 0x3d99940d, 0x3d8eea6b, 0x3d84fe4d, 0x3d778513,
    0x3d6655c2, 0x3d5657e4, 0x3d47763f, 0x3d399d19, 0x3d2cba15, 0x3d20bc1d, 0x3d159348, 0x3d0b30cc,
    0x3d0186e3, 0x3cf11177, 0x3ce054d2, 0x3cd0c1a8, 0x3cc2434f, 0x3cb4c691, 0x3ca8398b, 0x3c9c8b97,
    0x3c91ad39, 0x3c879008, 0x3c7c4d33, 0x3c6ac8e7, 0x3c5a7bf2, 0x3c4b50b3, 0x3c3d3311, 0x3c301052,
    0x3c23d70a, 0x3c187705, 0x3c0de12d, 0x3c040779, 0x3bf5b9b0, 0x3be4aa46, 0x3bd4ca15, 0x3bc6040f,
    0x3bb8449c, 0x3bab7983, 0x3b9f91cc, 0x3b947dae, 0x3b8a2e77, 0x3b80967d, 0x3b6f520e, 0x3b5eb47a,
    0x3b4f3e38, 0x3b40dac5, 0x3b33770f, 0x3b270153, 0x3b1b690d, 0x3b109edb, 0x3b06946f, 0x3afa78f0,
    0x3ae91528, 0x3ad8e673, 0x3ac9d75c, 0x3abbd3ed, 0x3aaec98e, 0x3aa2a6f7, 0x3a975c0e, 0x3a8cd9db,
    0x3a83126f, 0x3a73f1a3, 0x3a6301e2, 0x3a533f28, 0x3a44948c, 0x3a36ee9e, 0x3a2a3b44, 0x3a1e69a5,
    0x3a136a16, 0x3a092e02, 0x39ff4fac, 0x39ed95e2, 0x39dd1725, 0x39cdbd96, 0x39bf74d7, 0x39b229fb,
    0x39a5cb60, 0x399a489e, 0x398f9272, 0x39859aa9, 0x3978a815, 0x39676492, 0x395753e4, 0x394860c1,
    0x393a7753, 0x392d8529, 0x39217916, 0x39164324, 0x390bd472, 0x39021f2b, 0x38f22ce2, 0x38e15c91,
];

/// Full layers: proportional RoPE, theta 1e6, head_dim 512, factor 0.25: the 64 nonzero entries
/// (the remaining 192 are exactly 0).
const FULL_512_ROTARY: [u32; 64] = [
    0x3f800000, 0x3f728cf8, 0x3f65ced3, 0x3f59bc10, 0x3f4e4bad, 0x3f437523, 0x3f39305c, 0x3f2f75b1,
    0x3f263de0, 0x3f1d8209, 0x3f153ba8, 0x3f0d6492, 0x3f05f6ef, 0x3efdda64, 0x3ef0843c, 0x3ee3e172,
    0x3ed7e89b, 0x3ecc90c7, 0x3ec1d182, 0x3eb7a2c7, 0x3eadfcff, 0x3ea4d8f8, 0x3e9c2fe1, 0x3e93fb45,
    0x3e8c3504, 0x3e84d752, 0x3e7bb964, 0x3e6e7fde, 0x3e61f835, 0x3e561912, 0x3e4ad998, 0x3e403165,
    0x3e361887, 0x3e2c8776, 0x3e23770f, 0x3e1ae090, 0x3e12bd91, 0x3e0b0801, 0x3e03ba20, 0x3df99cf8,
    0x3dec7fd6, 0x3de01313, 0x3dd44d6c, 0x3dc92617, 0x3dbe94c6, 0x3db49196, 0x3dab150f, 0x3da2181d,
    0x3d99940d, 0x3d918287, 0x3d89dd84, 0x3d829f52, 0x3d778513, 0x3d6a8417, 0x3d5e3201, 0x3d5285a1,
    0x3d47763f, 0x3d3cfb9e, 0x3d330dec, 0x3d29a5c2, 0x3d20bc1d, 0x3d184a56, 0x3d104a21, 0x3d08b588,
];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn sliding_default_rope_matches_torch() {
    let got = RopeSpec::SLIDING_DEFAULT.inv_freq(256);
    assert_eq!(got.len(), 128);
    assert_eq!(bits(&got), SLIDING_256.to_vec());
    // AVX2 agrees for a multiple of 16 entries.
    assert_eq!(
        bits(&RopeSpec::SLIDING_DEFAULT.inv_freq_for(256, TorchCpuKernel::Avx2)),
        SLIDING_256.to_vec()
    );
    // torch's scalar kernel (glibc powf) differs from SLEEF in exactly one entry.
    let scalar = bits(&RopeSpec::SLIDING_DEFAULT.inv_freq_for(256, TorchCpuKernel::Scalar));
    let mut want = SLIDING_256.to_vec();
    want[111] = 0x39b229fa;
    assert_eq!(scalar, want);
}

#[test]
fn full_proportional_rope_matches_torch() {
    let got = RopeSpec::FULL_DEFAULT.inv_freq(512);
    assert_eq!(got.len(), 256);
    assert_eq!(RopeSpec::FULL_DEFAULT.rotary_pairs(512), 64);
    assert_eq!(bits(&got[..64]), FULL_512_ROTARY.to_vec());
    assert!(got[..64].iter().all(|&x| x > 0.0));
    assert!(
        got[64..].iter().all(|&x| x.to_bits() == 0),
        "entries past the rotary width must be exactly +0.0"
    );
    let scalar = bits(&RopeSpec::FULL_DEFAULT.inv_freq_for(512, TorchCpuKernel::Scalar));
    let mut want = FULL_512_ROTARY.to_vec();
    want[29] = 0x3e561911;
    assert_eq!(scalar[..64], want[..]);
}

fn fnv(h: &mut u64, v: &[f32]) {
    for x in v {
        for b in x.to_bits().to_le_bytes() {
            *h ^= b as u64;
            *h = h.wrapping_mul(0x100000001b3);
        }
    }
}

/// 41,755 values over 7 thetas x 12 head dims x {default, proportional 0.25/0.5/0.3/1.0}, hashed
/// (FNV-1a over the float32 bits) and compared with the same hash of torch's output for each CPU
/// kernel. Covers head dims whose entry count is not a multiple of the vector block, where
/// torch mixes SLEEF (vector body) and glibc powf (scalar tail).
#[test]
fn grid_matches_torch_for_every_kernel() {
    let bases = [10000.0, 1e6, 500000.0, 10.0, 1234567.0, 50000.0, 3.5];
    let dims = [16, 32, 64, 72, 96, 128, 256, 512, 80, 100, 6, 1024];
    for (kernel, want) in [
        (TorchCpuKernel::Scalar, 0xe9bdc4d291d20c57u64),
        (TorchCpuKernel::Avx2, 0xf859cdc18d71ffda),
        (TorchCpuKernel::Avx512, 0x8880a1911d7331ea),
    ] {
        let mut h = 0xcbf29ce484222325u64;
        let mut n = 0;
        for &theta in &bases {
            for &dim in &dims {
                let mut specs = vec![RopeSpec {
                    kind: RopeKind::Default,
                    theta,
                    partial_rotary_factor: 1.0,
                }];
                for p in [0.25, 0.5, 0.3, 1.0] {
                    specs.push(RopeSpec {
                        kind: RopeKind::Proportional,
                        theta,
                        partial_rotary_factor: p,
                    });
                }
                for s in specs {
                    let v = s.inv_freq_for(dim, kernel);
                    assert_eq!(v.len(), dim / 2);
                    n += v.len();
                    fnv(&mut h, &v);
                }
            }
        }
        assert_eq!(n, 41755);
        assert_eq!(h, want, "{kernel:?}");
    }
}
