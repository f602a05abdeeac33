//! The native decoder's arithmetic: int8 GEMV (weights quantized per output row, the input
//! vector per call) and the small fp32 ops around it.
//!
//! One decoder step multiplies a single vector by every weight matrix, so it is bound by how
//! fast the weights stream from memory (docs/performance.md). The AVX2 kernel reads each
//! weight byte once, four rows at a time, and prefetches the next four rows while it works:
//! without the prefetch it reached 7.5 GB/s on the 2-core EPYC VM, with it 12 GB/s, the
//! speed of a plain read. Integer sums are exact, so the AVX2 and scalar paths agree bit for bit,
//! and splitting the rows across threads changes no result.

use super::team::{self, Team};

/// An int8 matrix, row-major `[rows][cols]`, one fp32 scale per row: `w ≈ q * scale[row]`.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<i8>,
    pub scales: Vec<f32>,
    /// Per row, the sum of its int8 weights (the batched VNNI kernel feeds x + 128 as unsigned
    /// bytes and takes 128 times this off).
    pub sums: Vec<i32>,
    /// Read once per use from memory (the decoder step's weights when they are larger than the
    /// caches): prefetched non-temporally, which keeps them from evicting what does fit.
    pub streamed: bool,
}

/// A vector quantized symmetrically to [-127, 127]: `x ≈ q * scale`.
#[derive(Debug, Clone, Default)]
pub struct QuantVector {
    pub q: Vec<i8>,
    pub scale: f32,
}

/// Lanes of the element-wise loops below. Written as fixed-width chunks, they compile to SIMD
/// without `unsafe`: a plain float sum or max is not vectorized (it would reorder the operations),
/// and `f32::round` / `exp` / `tanh` are calls into libm.
const LANES: usize = 8;

/// 1.5 * 2^23: adding it rounds an f32 below 2^22 in magnitude to an integer (ties to even),
/// which the sum then holds in its low mantissa bits ([`round_to_int`]).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `v` rounded to the nearest integer (ties to even), for |v| < 2^22: read from the bits of
/// `v + ROUND_MAGIC`, not by a float-to-int conversion, which Rust saturates and LLVM then
/// leaves scalar in the loops of [`exp`] and [`quantize_into`].
#[inline(always)]
fn round_to_int(v: f32) -> i32 {
    ((v + ROUND_MAGIC).to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32)
}

/// Largest |x|: a NaN is ignored, an infinity returned.
#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            let a = v.abs();
            *m = if a > *m { a } else { *m };
        }
    }
    lanes.iter().chain(rest.iter()).fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m })
}

/// Sum of products, in `LANES` partial sums.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// [`dot`] of one `a` with `N` vectors `bs[n]` (each at least as long as `a`), each result bit
/// for bit [`dot`]'s: the same operations in the same order, only `N` independent sums side by
/// side, so the CPU overlaps what one sum would wait for (attention scores, several key
/// positions at once). Portable; [`dots_avx2`] is the same on AVX2 registers.
#[inline(always)]
pub fn dots<const N: usize>(a: &[f32], bs: [&[f32]; N]) -> [f32; N] {
    std::array::from_fn(|n| dot(a, &bs[n][..a.len()]))
}

/// [`dots`] on AVX2 registers, written out: the compiler kept the portable version's
/// interleaved sums in scalar registers. Multiply then add (no FMA), lane sums in lane order,
/// then the tail, as [`dot`] does.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn dots_avx2<const N: usize>(a: &[f32], bs: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    const { assert!(LANES == 8, "one AVX2 register per lane set") };
    for b in &bs {
        assert!(b.len() >= a.len(), "a vector shorter than the query");
    }
    let body = a.len() - a.len() % LANES;
    let mut acc = [_mm256_setzero_ps(); N];
    let mut c = 0;
    while c < body {
        // SAFETY: c + 8 <= body <= a.len() <= every b.len() (asserted above).
        let x = unsafe { _mm256_loadu_ps(a.as_ptr().add(c)) };
        for (s, b) in acc.iter_mut().zip(&bs) {
            let y = unsafe { _mm256_loadu_ps(b.as_ptr().add(c)) };
            *s = _mm256_add_ps(*s, _mm256_mul_ps(x, y));
        }
        c += LANES;
    }
    std::array::from_fn(|n| {
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[n]) };
        let tail: f32 = a[body..].iter().zip(&bs[n][body..]).map(|(x, y)| x * y).sum();
        lanes.iter().sum::<f32>() + tail
    })
}

/// `out = sum over j of p[j] * v(j)`, accumulated in the order j = 0, 1, ... from 0.0 for every
/// element (the order of `out.fill(0.0)` then `out += p[j] * v(j)` per j, so bit for bit that
/// loop), 32 elements at a time held in registers instead of re-read from `out` per j.
#[inline(always)]
pub fn weighted_sum<'v>(p: &[f32], v: impl Fn(usize) -> &'v [f32], out: &mut [f32]) {
    const BLOCK: usize = 4 * LANES;
    let mut start = 0;
    while start < out.len() {
        let width = (out.len() - start).min(BLOCK);
        let mut acc = [0f32; BLOCK];
        if width == BLOCK {
            for (j, pj) in p.iter().enumerate() {
                let x = &v(j)[start..start + BLOCK];
                for i in 0..BLOCK {
                    acc[i] += pj * x[i];
                }
            }
        } else {
            for (j, pj) in p.iter().enumerate() {
                for (a, x) in acc.iter_mut().zip(&v(j)[start..start + width]) {
                    *a += pj * x;
                }
            }
        }
        out[start..start + width].copy_from_slice(&acc[..width]);
        start += width;
    }
}

/// Quantizes values to [-127, 127] with one scale (`max |x| / 127`). -128 is never used, so
/// the AVX2 pair sums (2 * 127 * 127) cannot saturate 16 bits. A NaN becomes 0.
///
/// Built for AVX-512F, AVX2 and the baseline with the same operations, chosen at run time:
/// every input row of every product of a decoder step goes through here (4% of a loaded
/// server's time when it was scalar code).
fn quantize_into(x: &[f32], q: &mut Vec<i8>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { quantize_avx512(x, q) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { quantize_avx2(x, q) };
        }
    }
    quantize_body(x, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_avx512(x: &[f32], q: &mut Vec<i8>) -> f32 {
    quantize_body(x, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(x: &[f32], q: &mut Vec<i8>) -> f32 {
    quantize_body(x, q)
}

#[inline(always)]
fn quantize_body(x: &[f32], q: &mut Vec<i8>) -> f32 {
    let amax = abs_max(x);
    q.clear();
    q.resize(x.len(), 0);
    if amax == 0.0 || !amax.is_finite() {
        return if amax.is_finite() { 1.0 } else { f32::NAN };
    }
    let inv = 127.0 / amax;
    for (o, &v) in q.iter_mut().zip(x) {
        let c = (v * inv).clamp(-127.0, 127.0);
        let c = if c.is_nan() { 0.0 } else { c };
        *o = round_to_int(c) as i8;
    }
    amax / 127.0
}

impl QuantMatrix {
    /// Quantizes a row-major fp32 matrix, each row on its own scale.
    pub fn quantize(rows: usize, cols: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), rows * cols, "matrix data does not match its shape");
        let mut data = Vec::with_capacity(rows * cols);
        let mut scales = Vec::with_capacity(rows);
        let mut q = Vec::with_capacity(cols);
        let mut sums = Vec::with_capacity(rows);
        for row in w.chunks_exact(cols.max(1)) {
            scales.push(quantize_into(row, &mut q));
            sums.push(q.iter().map(|&v| i32::from(v)).sum());
            data.extend_from_slice(&q);
        }
        Self { rows, cols, data, scales, sums, streamed: false }
    }
}

impl QuantVector {
    pub fn set(&mut self, x: &[f32]) {
        self.scale = quantize_into(x, &mut self.q);
    }
}

/// Matrices smaller than this are not split across threads: the hand-off would cost more.
const PARALLEL_MIN_BYTES: usize = 64 * 1024;

/// A weight matrix [`gemv`] can split by rows: the int8 [`QuantMatrix`] here, the 4-bit
/// [`super::q4::Q4Matrix`], or either behind [`super::matrix::Matrix`].
pub trait RowProduct: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Bytes read by one product (what decides whether splitting it pays).
    fn bytes(&self) -> usize;
    /// Rows `first..first + y.len()` of `W x`, on this thread, with the process's kernel.
    fn product_rows(&self, first: usize, x: &QuantVector, y: &mut [f32]);
    /// The same rows for several vectors (`ys[i]` for `xs[i]`), each result bit for bit the
    /// one of `product_rows`; by default tile by tile of rows, so the weights come from memory
    /// once.
    fn product_rows_batch(&self, first: usize, xs: &[&QuantVector], ys: &mut [&mut [f32]]) {
        tiled_rows(self, first, xs, ys)
    }
}

impl RowProduct for QuantMatrix {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn bytes(&self) -> usize {
        self.data.len()
    }
    fn product_rows(&self, first: usize, x: &QuantVector, y: &mut [f32]) {
        gemv_rows(self, first, x, y)
    }
    fn product_rows_batch(&self, first: usize, xs: &[&QuantVector], ys: &mut [&mut [f32]]) {
        gemv_rows_batch_with(kernel(), self, first, xs, ys)
    }
}

/// Asserts a batched product's arguments against a (rows, cols) matrix, as the kernels rely on:
/// one output per vector, every output of one length, rows `first..` of that length in range.
pub(super) fn check_batch(shape: (usize, usize), first: usize, xs: &[&QuantVector], ys: &[&mut [f32]]) {
    let (rows, cols) = shape;
    assert_eq!(xs.len(), ys.len(), "one output per input vector");
    let len = ys.first().map_or(0, |y| y.len());
    assert!(first + len <= rows, "rows out of range");
    for (x, y) in xs.iter().zip(ys) {
        assert_eq!(x.q.len(), cols, "vector length does not match the matrix");
        assert_eq!(y.len(), len, "outputs of different lengths");
    }
}

/// [`RowProduct::product_rows_batch`] of an int8 matrix with a given kernel (the tests run
/// each one). VNNI and AVX2 have kernels of their own that load each weight block once for
/// several vectors; the others run their one-vector kernel tile by tile.
pub fn gemv_rows_batch_with(kernel: Kernel, w: &QuantMatrix, first: usize, xs: &[&QuantVector], ys: &mut [&mut [f32]]) {
    check_batch((w.rows, w.cols), first, xs, ys);
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, Kernel::Avx512Vnni | Kernel::Avx2) {
        assert!(kernel.supported(), "the {} kernel does not run on this CPU", kernel.name());
        use avx2_impl::{CACHE, STREAM};
        // SAFETY: the CPU runs the kernel (asserted); rows and lengths are asserted above.
        unsafe {
            match (kernel, w.streamed) {
                (Kernel::Avx512Vnni, true) => avx512_impl::gemv_vnni_batch::<STREAM>(w, first, xs, ys),
                (Kernel::Avx512Vnni, false) => avx512_impl::gemv_vnni_batch::<CACHE>(w, first, xs, ys),
                (_, true) => avx2_impl::gemv_batch::<STREAM>(w, first, xs, ys),
                (_, false) => avx2_impl::gemv_batch::<CACHE>(w, first, xs, ys),
            }
        }
        return;
    }
    for_each_tile(w.cols, xs, ys, |row, x, y| gemv_rows_with(kernel, w, first + row, x, y));
}

/// `y = W x` for a quantized `W` (rows x cols) and `x` (cols). Called inside a decoder
/// [`Team`] of more than one thread, the rows are split across its threads (two cores read memory faster
/// than one); anywhere else it runs on the calling thread alone.
pub fn gemv<M: RowProduct + ?Sized>(w: &M, x: &QuantVector, y: &mut [f32]) {
    assert_eq!(x.q.len(), w.cols(), "vector length does not match the matrix");
    assert_eq!(y.len(), w.rows(), "output length does not match the matrix");
    team::with_current(|team| {
        let Some(team) = team.filter(|t| splits(t, w.bytes())) else {
            return w.product_rows(0, x, y);
        };
        let part = rows_per_part(w.rows(), team.threads());
        team.run_parts(y.chunks_mut(part).collect(), |i, ys| w.product_rows(i * part, x, ys));
    })
}

/// Whether a product of `bytes` weights is split across `team`: smaller ones are not, since
/// the hand-off would cost more.
fn splits(team: &Team, bytes: usize) -> bool {
    team.threads() > 1 && bytes >= PARALLEL_MIN_BYTES
}

/// Rows per thread: multiples of 4, so each part keeps the 4-row kernel.
fn rows_per_part(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads).next_multiple_of(4)
}

/// Weight bytes of one tile of a batched product: small enough to stay in the L1 cache while
/// every vector of the batch passes over it, so a batch reads each weight from memory once.
const TILE_BYTES: usize = 16 * 1024;

/// `ys[i] = W xs[i]` for a batch of vectors (continuous batching: one decoder step of several
/// rows). Tile by tile of rows, each vector runs the same kernel on the same rows as [`gemv`]
/// would, so every result is bit for bit the one of [`gemv`] on that vector alone; only the
/// weights are read from memory once per tile instead of once per vector. Inside a [`Team`]
/// of more than one thread the rows are split across its threads as in [`gemv`].
pub fn gemv_batch<M: RowProduct + ?Sized>(w: &M, xs: &[&QuantVector], ys: &mut [&mut [f32]]) {
    assert_eq!(xs.len(), ys.len(), "one output per input vector");
    match xs.len() {
        0 => return,
        1 => return gemv(w, xs[0], ys[0]),
        _ => {}
    }
    for (x, y) in xs.iter().zip(ys.iter()) {
        assert_eq!(x.q.len(), w.cols(), "vector length does not match the matrix");
        assert_eq!(y.len(), w.rows(), "output length does not match the matrix");
    }
    team::with_current(|team| {
        let Some(team) = team.filter(|t| splits(t, w.bytes())) else {
            return w.product_rows_batch(0, xs, ys);
        };
        let part = rows_per_part(w.rows(), team.threads());
        let mut parts: Vec<Vec<&mut [f32]>> =
            (0..w.rows().div_ceil(part)).map(|_| Vec::with_capacity(xs.len())).collect();
        for y in ys.iter_mut() {
            for (slot, chunk) in parts.iter_mut().zip(y.chunks_mut(part)) {
                slot.push(chunk);
            }
        }
        team.run_parts(parts, |i, ys| w.product_rows_batch(i * part, xs, ys));
    })
}

/// Rows `first..first + ys[0].len()` of `W x` for every vector, tile by tile.
pub fn tiled_rows<M: RowProduct + ?Sized>(w: &M, first: usize, xs: &[&QuantVector], ys: &mut [&mut [f32]]) {
    let row_bytes = w.bytes() / w.rows().max(1);
    for_each_tile(row_bytes, xs, ys, |row, x, y| w.product_rows(first + row, x, y));
}

/// Runs `product(row, x, y)` for every vector on each tile of rows (`row` the tile's first
/// output row, `y` its slice of the vector's output), tile after tile.
pub(super) fn for_each_tile(
    row_bytes: usize,
    xs: &[&QuantVector],
    ys: &mut [&mut [f32]],
    mut product: impl FnMut(usize, &QuantVector, &mut [f32]),
) {
    let rows = ys.first().map_or(0, |y| y.len());
    // Whole 4-row blocks, so each tile keeps the kernels' 4-row path.
    let tile = (TILE_BYTES / row_bytes.max(1)).max(4) / 4 * 4;
    let mut start = 0;
    while start < rows {
        let end = (start + tile).min(rows);
        for (x, y) in xs.iter().zip(ys.iter_mut()) {
            product(start, x, &mut y[start..end]);
        }
        start = end;
    }
}

/// Whether a decoder step's weights (`step_bytes`) are streamed: prefetched non-temporally
/// (`_MM_HINT_NTA`, `QuantMatrix::streamed`) because they cannot stay in the last-level cache
/// between steps. On the Zen 4 EPYC (32 MiB L3) that made flan-t5-small (36.7 MiB) 5% faster;
/// on an Intel Xeon with a 260 MiB L3 the same prefetch made its step 3.5x slower (5.2 against
/// 1.5 ms, `examples/kernels.rs flan-t5-small`), since it sent to memory weights the L3 held.
/// So the bar is the CPU's own last-level cache, read at run time (`STREAM_ABOVE_BYTES` when
/// unknown).
pub fn streams(step_bytes: usize) -> bool {
    static LAST_LEVEL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    step_bytes > *LAST_LEVEL.get_or_init(|| last_level_cache_bytes().unwrap_or(super::weights::STREAM_ABOVE_BYTES))
}

/// The largest cache of CPU 0, from sysfs (Linux): `index*/size` as `48K`, `2048K`, `260M`.
fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("size")).ok())
        .filter_map(|size| parse_cache_size(size.trim()))
        .max()
}

fn parse_cache_size(text: &str) -> Option<usize> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: usize = digits.parse().ok()?;
    match unit {
        "" => Some(n),
        "K" => Some(n << 10),
        "M" => Some(n << 20),
        "G" => Some(n << 30),
        _ => None,
    }
}

/// The int8 GEMV kernels, fastest first. One is chosen per process from the CPU's features
/// (`Kernel::detect`, or `select` before the first product); all give the scalar reference's
/// results bit for bit, since they only reorder exact integer sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Kernel {
    /// AVX-512 VNNI: `vpdpbusd`, 64 byte products summed into i32 lanes in one instruction.
    Avx512Vnni,
    /// AVX-512BW: `vpmaddubsw` + `vpmaddwd` on 64 bytes.
    Avx512Bw,
    /// AVX2: `vpmaddubsw` + `vpmaddwd` on 32 bytes.
    Avx2,
    /// Plain Rust: the reference every other kernel is tested against.
    Scalar,
}

impl Kernel {
    pub const ALL: [Kernel; 4] = [Kernel::Avx512Vnni, Kernel::Avx512Bw, Kernel::Avx2, Kernel::Scalar];

    /// Whether this CPU can run the kernel.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            // VL too: the 4-bit kernels use 128-bit masked loads (every AVX-512BW CPU has it).
            let bw = || {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
            };
            match self {
                Kernel::Avx512Vnni => bw() && std::is_x86_feature_detected!("avx512vnni"),
                Kernel::Avx512Bw => bw(),
                Kernel::Avx2 => std::is_x86_feature_detected!("avx2"),
                Kernel::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Scalar
        }
    }

    /// The fastest kernel this CPU supports.
    pub fn detect() -> Self {
        Self::ALL.into_iter().find(|k| k.supported()).unwrap_or(Kernel::Scalar)
    }

    /// Requests a worker decodes together by default (continuous batching) with this kernel:
    /// what served the most requests per second at concurrency 8 on 2 cores without a worse
    /// p99. VNNI (Intel Xeon, session 7 of docs/performance.md): 8, 1.42x one at a time. AVX2
    /// (AMD EPYC Zen 3, session 10): 2, 1.20x one at a time with a lower p99, where 8 gave
    /// 1.12x with a p99 1.27x higher, since past two rows its batched product is bound by
    /// multiply-adds, not by reading the weights. AVX-512BW (a tiled product, not measured): 2.
    /// Scalar: 1, nothing to share.
    pub fn batch_requests(self) -> usize {
        match self {
            Kernel::Avx512Vnni => 8,
            Kernel::Avx512Bw | Kernel::Avx2 => 2,
            Kernel::Scalar => 1,
        }
    }

    /// Rows a batched product takes for about the price of one, which bounds the draft tokens
    /// a step carries (engine/lookup.rs). VNNI, shipped shape (`examples/kernels`, Intel Xeon):
    /// 0.135 ms a step for 1 row, 0.141 for 4, 0.242 for 8. AVX2 (session 10): 0.13-0.15 for 1,
    /// 0.16-0.18 for 2, 0.33-0.36 for 4. AVX-512BW and scalar run one vector at a time: 1.
    pub fn free_rows(self) -> usize {
        match self {
            Kernel::Avx512Vnni => 4,
            Kernel::Avx2 => 2,
            Kernel::Avx512Bw | Kernel::Scalar => 1,
        }
    }

    /// The name used in logs, metrics and `--native-kernel`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::Avx512Bw => "avx512-bw",
            Kernel::Avx2 => "avx2",
            Kernel::Scalar => "scalar",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();

/// Fixes the process's kernel before the first product (a benchmark or `--native-kernel`).
/// Refuses one the CPU cannot run, or a change after the kernel was already in use.
pub fn select(kernel: Kernel) -> Result<Kernel, String> {
    if !kernel.supported() {
        return Err(format!("this CPU cannot run the {} kernel (supported: {})", kernel.name(), supported_names()));
    }
    let chosen = *KERNEL.get_or_init(|| kernel);
    if chosen != kernel {
        return Err(format!("the {} kernel is already in use; it is chosen once per process", chosen.name()));
    }
    Ok(chosen)
}

/// The process's kernel: the one selected, else the fastest the CPU supports.
pub fn kernel() -> Kernel {
    *KERNEL.get_or_init(Kernel::detect)
}

/// The kernels this CPU supports, comma-separated, fastest first.
pub fn supported_names() -> String {
    Kernel::ALL.into_iter().filter(|k| k.supported()).map(Kernel::name).collect::<Vec<_>>().join(", ")
}

/// Rows `first..first + y.len()` of `W x`, on this thread, with the process's kernel.
pub fn gemv_rows(w: &QuantMatrix, first: usize, x: &QuantVector, y: &mut [f32]) {
    gemv_rows_with(kernel(), w, first, x, y)
}

/// Rows `first..first + y.len()` of `W x` with a given kernel (the tests run each one).
pub fn gemv_rows_with(kernel: Kernel, w: &QuantMatrix, first: usize, x: &QuantVector, y: &mut [f32]) {
    assert_eq!(x.q.len(), w.cols, "vector length does not match the matrix");
    assert!(first + y.len() <= w.rows, "rows out of range");
    assert!(kernel.supported(), "the {} kernel does not run on this CPU", kernel.name());
    #[cfg(target_arch = "x86_64")]
    {
        use avx2_impl::{CACHE, STREAM};
        // SAFETY: the CPU supports the kernel's instructions (asserted above); the row range is
        // asserted above and every kernel reads only rows first..first + y.len().
        unsafe {
            match (kernel, w.streamed) {
                (Kernel::Avx512Vnni, true) => avx512_impl::gemv_vnni::<STREAM>(w, first, x, y),
                (Kernel::Avx512Vnni, false) => avx512_impl::gemv_vnni::<CACHE>(w, first, x, y),
                (Kernel::Avx512Bw, true) => avx512_impl::gemv_bw::<STREAM>(w, first, x, y),
                (Kernel::Avx512Bw, false) => avx512_impl::gemv_bw::<CACHE>(w, first, x, y),
                (Kernel::Avx2, true) => avx2_impl::gemv::<STREAM>(w, first, x, y),
                (Kernel::Avx2, false) => avx2_impl::gemv::<CACHE>(w, first, x, y),
                (Kernel::Scalar, _) => gemv_scalar(w, first, x, y),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    gemv_scalar(w, first, x, y);
}

pub fn gemv_scalar(w: &QuantMatrix, first: usize, x: &QuantVector, y: &mut [f32]) {
    for (i, out) in y.iter_mut().enumerate() {
        let r = first + i;
        let row = &w.data[r * w.cols..(r + 1) * w.cols];
        let dot: i32 = row.iter().zip(&x.q).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
        *out = dot as f32 * (w.scales[r] * x.scale);
    }
}

/// The loop of a batched kernel: rows four at a time (then one at a time), vectors in groups
/// of up to four, each pair computed by `$block::<R, N, HINT>(w, first, r, xs, ys)` (rows
/// `first + r ..` for those vectors, written at `r..` of their outputs).
macro_rules! batched_blocks {
    ($block:ident, $hint:ident, $w:expr, $first:expr, $xs:expr, $ys:expr) => {{
        let (w, first, xs, ys): (&QuantMatrix, usize, &[&QuantVector], &mut [&mut [f32]]) = ($w, $first, $xs, $ys);
        let rows = ys.first().map_or(0, |y| y.len());
        let mut r = 0;
        while r < rows {
            let four = rows - r >= 4;
            let mut g = 0;
            while g < xs.len() {
                let n = (xs.len() - g).min(4);
                let (x, y) = (&xs[g..g + n], &mut ys[g..g + n]);
                match (four, n) {
                    (true, 4) => $block::<4, 4, $hint>(w, first, r, x, y),
                    (true, 3) => $block::<4, 3, $hint>(w, first, r, x, y),
                    (true, 2) => $block::<4, 2, $hint>(w, first, r, x, y),
                    (true, _) => $block::<4, 1, $hint>(w, first, r, x, y),
                    (false, 4) => $block::<1, 4, $hint>(w, first, r, x, y),
                    (false, 3) => $block::<1, 3, $hint>(w, first, r, x, y),
                    (false, 2) => $block::<1, 2, $hint>(w, first, r, x, y),
                    (false, _) => $block::<1, 1, $hint>(w, first, r, x, y),
                }
                g += n;
            }
            r += if four { 4 } else { 1 };
        }
    }};
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2_impl {
    use std::arch::x86_64::*;

    use super::{QuantMatrix, QuantVector};

    /// Sum of the eight i32 lanes (the 4-bit kernels use it too).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_hadd_epi32(s, s);
        let s = _mm_hadd_epi32(s, s);
        _mm_cvtsi128_si32(s)
    }

    /// Dot of 32 int8 pairs as 8 i32 lanes: |x| (u8) times w with x's sign (the vpmaddubsw
    /// trick, since AVX2 has no signed x signed byte multiply).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot32(ax: __m256i, xv: __m256i, wv: __m256i, ones: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv)), ones)
    }

    /// Prefetch hints: `_MM_HINT_NTA` for weights read once per step, `_MM_HINT_T0` otherwise.
    pub const STREAM: i32 = _MM_HINT_NTA;
    pub const CACHE: i32 = _MM_HINT_T0;

    /// The dot of one weight row with x over the columns `from..` that a 32-byte block does not
    /// cover, one product at a time.
    fn tail_dot(row: &[i8], x: &[i8], from: usize) -> i32 {
        row[from..].iter().zip(&x[from..]).map(|(&w, &v)| i32::from(w) * i32::from(v)).sum()
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn gemv<const HINT: i32>(w: &QuantMatrix, first: usize, x: &QuantVector, y: &mut [f32]) {
        let (rows, cols) = (y.len(), w.cols);
        let body = cols - cols % 32;
        let ones = _mm256_set1_epi16(1);
        let data = &w.data[first * cols..(first + rows) * cols];
        let scales = &w.scales[first..first + rows];
        let wp = data.as_ptr();
        let xp = x.q.as_ptr();
        let end = wp.add(data.len());
        let tail = |r: usize| tail_dot(&data[r * cols..(r + 1) * cols], &x.q, body);
        let mut r = 0;
        while r + 4 <= rows {
            let base = wp.add(r * cols);
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256());
            let mut c = 0;
            while c < body {
                // The next four rows are 4 * cols bytes ahead; fetch 128 of them per 32 columns.
                let pf = base.wrapping_add(4 * cols + 4 * c);
                if pf < end {
                    _mm_prefetch::<HINT>(pf);
                    _mm_prefetch::<HINT>(pf.wrapping_add(64));
                }
                let xv = _mm256_loadu_si256(xp.add(c) as *const __m256i);
                let ax = _mm256_sign_epi8(xv, xv);
                a0 = _mm256_add_epi32(a0, dot32(ax, xv, _mm256_loadu_si256(base.add(c) as *const __m256i), ones));
                a1 =
                    _mm256_add_epi32(a1, dot32(ax, xv, _mm256_loadu_si256(base.add(cols + c) as *const __m256i), ones));
                a2 = _mm256_add_epi32(
                    a2,
                    dot32(ax, xv, _mm256_loadu_si256(base.add(2 * cols + c) as *const __m256i), ones),
                );
                a3 = _mm256_add_epi32(
                    a3,
                    dot32(ax, xv, _mm256_loadu_si256(base.add(3 * cols + c) as *const __m256i), ones),
                );
                c += 32;
            }
            for (i, acc) in [a0, a1, a2, a3].into_iter().enumerate() {
                let dot = hsum(acc) + tail(r + i);
                y[r + i] = dot as f32 * (scales[r + i] * x.scale);
            }
            r += 4;
        }
        while r < rows {
            let base = wp.add(r * cols);
            let mut acc = _mm256_setzero_si256();
            let mut c = 0;
            while c < body {
                let xv = _mm256_loadu_si256(xp.add(c) as *const __m256i);
                let ax = _mm256_sign_epi8(xv, xv);
                acc = _mm256_add_epi32(acc, dot32(ax, xv, _mm256_loadu_si256(base.add(c) as *const __m256i), ones));
                c += 32;
            }
            y[r] = (hsum(acc) + tail(r)) as f32 * (scales[r] * x.scale);
            r += 1;
        }
    }

    /// `ys[n] = W xs[n]`, rows `first..`: four rows at a time, each 32-byte block of weights
    /// loaded once for up to four vectors. Each sum is the one-vector kernel's exact integer
    /// dot, so every result is the scalar reference's bit for bit; what the batch saves is the
    /// weight loads, x's sign work per row, and (four rows' sums reduced together, [`hsum4`])
    /// most of the horizontal adds: 1.5x the tiled one-vector kernel at 2-8 vectors on a Zen 3
    /// (docs/performance.md, session 10). Groups of four beat groups of two (which would keep
    /// every sum in a register) by 1.15-1.3x in the same run.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemv_batch<const HINT: i32>(
        w: &QuantMatrix,
        first: usize,
        xs: &[&QuantVector],
        ys: &mut [&mut [f32]],
    ) {
        batched_blocks!(block, HINT, w, first, xs, ys);
    }

    /// Rows `first + r .. first + r + R` for `N` vectors, written at `r..r + R` of each output.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block<const R: usize, const N: usize, const HINT: i32>(
        w: &QuantMatrix,
        first: usize,
        r: usize,
        xs: &[&QuantVector],
        ys: &mut [&mut [f32]],
    ) {
        let cols = w.cols;
        let body = cols - cols % 32;
        let row = first + r;
        let base = w.data.as_ptr().add(row * cols);
        let end = w.data.as_ptr().add(w.data.len());
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); N]; R];
        let mut c = 0;
        while c < body {
            // The next R rows are R * cols bytes ahead: fetch R * 32 of them per 32 columns.
            let pf = base.wrapping_add(R * cols + R * c);
            if pf < end {
                _mm_prefetch::<HINT>(pf);
                if R == 4 {
                    _mm_prefetch::<HINT>(pf.wrapping_add(64));
                }
            }
            let mut xv = [_mm256_setzero_si256(); N];
            let mut ax = [_mm256_setzero_si256(); N];
            for ((v, a), x) in xv.iter_mut().zip(ax.iter_mut()).zip(xs) {
                *v = _mm256_loadu_si256(x.q.as_ptr().add(c) as *const __m256i);
                *a = _mm256_sign_epi8(*v, *v);
            }
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_si256(base.add(i * cols + c) as *const __m256i);
                for ((s, v), a) in acc_row.iter_mut().zip(&xv).zip(&ax) {
                    *s = _mm256_add_epi32(*s, dot32(*a, *v, wv, ones));
                }
            }
            c += 32;
        }
        // The columns after the last whole 32.
        let tail = |i: usize, x: &QuantVector| tail_dot(&w.data[(row + i) * cols..(row + i + 1) * cols], &x.q, body);
        if R == 4 {
            let scales = _mm_loadu_ps(w.scales.as_ptr().add(row));
            for (n, (x, y)) in xs.iter().zip(ys.iter_mut()).enumerate() {
                let mut dots = hsum4(acc[0][n], acc[1][n], acc[2][n], acc[3][n]);
                if body < cols {
                    let tails = [tail(0, x), tail(1, x), tail(2, x), tail(3, x)];
                    dots = _mm_add_epi32(dots, _mm_loadu_si128(tails.as_ptr() as *const __m128i));
                }
                // dot * (scale * x.scale), the scalar reference's order.
                let out = _mm_mul_ps(_mm_cvtepi32_ps(dots), _mm_mul_ps(scales, _mm_set1_ps(x.scale)));
                _mm_storeu_ps(y[r..r + 4].as_mut_ptr(), out);
            }
            return;
        }
        for (i, acc_row) in acc.iter().enumerate() {
            let scale = w.scales[row + i];
            for ((a, x), y) in acc_row.iter().zip(xs).zip(ys.iter_mut()) {
                let dot = hsum(*a).wrapping_add(tail(i, x));
                y[r + i] = dot as f32 * (scale * x.scale);
            }
        }
    }

    /// The sums of the 8 lanes of a, b, c and d, in that order (wrapping, like the scalar sum).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum4(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then the same for c and d.
        let ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        let cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
        // Per 128-bit lane: [sum a, sum b, sum c, sum d] of that lane; then the two lanes added.
        let s = _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
        _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s))
    }
}

/// The AVX-512 kernels: 64 columns per instruction, four rows at a time. AVX-512 has no
/// `vpsignb`, so the weights take x's sign through a masked negation; |x| is the unsigned
/// operand. Weights are never -128 (`quantize_into`), so the negation cannot overflow.
#[cfg(target_arch = "x86_64")]
mod avx512_impl {
    use std::arch::x86_64::*;

    use super::{QuantMatrix, QuantVector};

    /// 64 products |x| * (w with x's sign) added into 16 i32 lanes, in one VNNI instruction.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dot64_vnni(acc: __m512i, ax: __m512i, sw: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, ax, sw)
    }

    /// The same sums in two instructions: pairs (at most 2 * 127 * 127, no i16 saturation),
    /// then pairs of pairs into i32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dot64_bw(acc: __m512i, ax: __m512i, sw: __m512i) -> __m512i {
        _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(ax, sw), _mm512_set1_epi16(1)))
    }

    /// x's 64 columns from `c` (fewer at the end: masked): |x|, x's sign mask, the load mask.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn x_block(x: &QuantVector, c: usize) -> (__m512i, __mmask64, __mmask64) {
        let take = (x.q.len() - c).min(64);
        let mask = if take == 64 { !0 } else { (1u64 << take) - 1 };
        let xv = _mm512_maskz_loadu_epi8(mask, x.q.as_ptr().add(c));
        (_mm512_abs_epi8(xv), _mm512_movepi8_mask(xv), mask)
    }

    /// 64 weights (masked like x's block), negated where x is negative.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn signed_weights(p: *const i8, neg: __mmask64, mask: __mmask64) -> __m512i {
        let wv = _mm512_maskz_loadu_epi8(mask, p);
        _mm512_mask_sub_epi8(wv, neg, _mm512_setzero_si512(), wv)
    }

    macro_rules! gemv_kernel {
        ($name:ident, $dot:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const HINT: i32>(w: &QuantMatrix, first: usize, x: &QuantVector, y: &mut [f32]) {
                let (rows, cols) = (y.len(), w.cols);
                let data = &w.data[first * cols..(first + rows) * cols];
                let scales = &w.scales[first..first + rows];
                let wp = data.as_ptr();
                let end = wp.add(data.len());
                let mut r = 0;
                while r + 4 <= rows {
                    let base = wp.add(r * cols);
                    let mut acc = [_mm512_setzero_si512(); 4];
                    for c in (0..cols).step_by(64) {
                        // The next four rows are 4 * cols bytes ahead: fetch 256 of them per block.
                        let pf = base.wrapping_add(4 * cols + 4 * c);
                        if pf < end {
                            for line in 0..4 {
                                _mm_prefetch::<HINT>(pf.wrapping_add(64 * line));
                            }
                        }
                        let (ax, neg, mask) = x_block(x, c);
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = $dot(*a, ax, signed_weights(base.add(i * cols + c), neg, mask));
                        }
                    }
                    for (i, a) in acc.into_iter().enumerate() {
                        y[r + i] = _mm512_reduce_add_epi32(a) as f32 * (scales[r + i] * x.scale);
                    }
                    r += 4;
                }
                while r < rows {
                    let base = wp.add(r * cols);
                    let mut a = _mm512_setzero_si512();
                    for c in (0..cols).step_by(64) {
                        let (ax, neg, mask) = x_block(x, c);
                        a = $dot(a, ax, signed_weights(base.add(c), neg, mask));
                    }
                    y[r] = _mm512_reduce_add_epi32(a) as f32 * (scales[r] * x.scale);
                    r += 1;
                }
            }
        };
    }

    gemv_kernel!(gemv_vnni, dot64_vnni, "avx512f,avx512bw,avx512vnni");

    /// `ys[n] = W xs[n]`, rows `first..`: four rows at a time, each block of weights loaded
    /// once for up to four vectors. x + 128 is the unsigned operand (the sign fix-up of the
    /// one-vector kernel would be per vector), so each sum is off by 128 times the row's weight
    /// sum, taken off after: the result is the exact integer dot, as in the scalar reference.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn gemv_vnni_batch<const HINT: i32>(
        w: &QuantMatrix,
        first: usize,
        xs: &[&QuantVector],
        ys: &mut [&mut [f32]],
    ) {
        batched_blocks!(block, HINT, w, first, xs, ys);
    }

    /// Rows `first + r .. first + r + R` for `N` vectors, written at `r..r + R` of each output.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn block<const R: usize, const N: usize, const HINT: i32>(
        w: &QuantMatrix,
        first: usize,
        r: usize,
        xs: &[&QuantVector],
        ys: &mut [&mut [f32]],
    ) {
        let cols = w.cols;
        let row = first + r;
        let base = w.data.as_ptr().add(row * cols);
        let end = w.data.as_ptr().add(w.data.len());
        let bias = _mm512_set1_epi8(i8::MIN);
        let mut acc = [[_mm512_setzero_si512(); N]; R];
        let mut c = 0;
        while c < cols {
            let take = (cols - c).min(64);
            let mask = if take == 64 { !0u64 } else { (1u64 << take) - 1 };
            // The next R rows are R * cols bytes ahead: fetch R lines of them per block.
            let pf = base.wrapping_add(R * cols + R * c);
            if pf < end {
                for line in 0..R {
                    _mm_prefetch::<HINT>(pf.wrapping_add(64 * line));
                }
            }
            // Masked-off columns are 0 in the weights, so x's 128 there adds nothing.
            let mut xv = [_mm512_setzero_si512(); N];
            for (v, x) in xv.iter_mut().zip(xs) {
                *v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x.q.as_ptr().add(c)), bias);
            }
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let wv = _mm512_maskz_loadu_epi8(mask, base.add(i * cols + c));
                for (a, v) in acc_row.iter_mut().zip(&xv) {
                    *a = _mm512_dpbusd_epi32(*a, *v, wv);
                }
            }
            c += 64;
        }
        if R == 4 {
            // Four rows' sums of one vector in one register (a full reduction per output cost
            // more than the products for 256 columns); the same exact integers, the same floats.
            let offsets = _mm_slli_epi32::<7>(_mm_loadu_si128(w.sums.as_ptr().add(row) as *const __m128i));
            let scales = _mm_loadu_ps(w.scales.as_ptr().add(row));
            for (n, (x, y)) in xs.iter().zip(ys.iter_mut()).enumerate() {
                let dots = _mm_sub_epi32(hsum4(acc[0][n], acc[1][n], acc[2][n], acc[3][n]), offsets);
                let out = _mm_mul_ps(_mm_cvtepi32_ps(dots), _mm_mul_ps(scales, _mm_set1_ps(x.scale)));
                _mm_storeu_ps(y[r..r + 4].as_mut_ptr(), out);
            }
            return;
        }
        for (i, acc_row) in acc.iter().enumerate() {
            let offset = 128i32.wrapping_mul(w.sums[row + i]);
            let scale = w.scales[row + i];
            for ((a, x), y) in acc_row.iter().zip(xs).zip(ys.iter_mut()) {
                let dot = _mm512_reduce_add_epi32(*a).wrapping_sub(offset);
                y[r + i] = dot as f32 * (scale * x.scale);
            }
        }
    }

    /// The sums of the 16 lanes of a, b, c and d, in that order (wrapping, like the scalar sum).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn hsum4(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m128i {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then the same for c and d.
        let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        // Per 128-bit lane: [sum a, sum b, sum c, sum d] of that lane; then the four lanes added.
        let s = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
        let s = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64::<1>(s));
        _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s))
    }
    gemv_kernel!(gemv_bw, dot64_bw, "avx512f,avx512bw");
}

/// T5's layer norm: scale only, no mean subtraction, no bias.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = dot(x, x) / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// e^x without libm, so loops over it vectorize (Cephes' `expf` polynomial: relative error
/// below 2e-7; inputs clamped to [-87.3, 88.0], where e^x stays a normal f32).
#[inline]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.0);
    let n_int = round_to_int(x * LOG2E);
    let n = n_int as f32; // exact: |n| <= 127
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n_int + 127) << 23) as u32)
}

/// In-place softmax.
#[inline]
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / x.iter().sum::<f32>();
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// GELU, tanh approximation (`gelu_new` in Hugging Face T5 configs), with
/// tanh(z) = 1 - 2 / (e^2z + 1).
#[inline]
pub fn gelu_new(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    let z = C * (x + 0.044_715 * x * x * x);
    let tanh = 1.0 - 2.0 / (exp(2.0 * z) + 1.0);
    0.5 * x * (1.0 + tanh)
}

/// Inputs and kernel lists for the kernel tests here and in q4.rs.
#[cfg(test)]
pub(crate) mod testing {
    use super::Kernel;

    pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `n` pseudo-random vectors of `cols`, quantized.
    pub fn vectors(n: usize, cols: usize, seed: u64) -> Vec<super::QuantVector> {
        (0..n)
            .map(|b| {
                let mut x = super::QuantVector::default();
                x.set(&pseudo_random(cols, seed + b as u64));
                x
            })
            .collect()
    }

    /// Every kernel this CPU runs; the ones it cannot are named on stderr as skipped.
    pub fn supported_kernels() -> Vec<Kernel> {
        let (run, skip): (Vec<Kernel>, Vec<Kernel>) = Kernel::ALL.into_iter().partition(|k| k.supported());
        for k in &skip {
            eprintln!("skipped: the {} kernel does not run on this CPU", k.name());
        }
        run
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{pseudo_random, supported_kernels, vectors};
    use super::*;

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("48K"), Some(48 << 10));
        assert_eq!(parse_cache_size("266240K"), Some(266_240 << 10));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("1024"), Some(1024));
        assert_eq!(parse_cache_size("K"), None);
        assert_eq!(parse_cache_size("12X"), None);
    }

    #[test]
    fn a_batched_product_gives_each_vector_its_own_product_bit_for_bit() {
        // Tiles of 16 KiB: 64 rows of 256 columns, 5 rows of 3000 (rounded down to 4).
        for (rows, cols, batch) in [(130, 256, 3), (9, 3000, 5), (64, 256, 2), (7, 33, 4), (300, 64, 8)] {
            let w = QuantMatrix::quantize(rows, cols, &pseudo_random(rows * cols, cols as u64));
            let xs = vectors(batch, cols, 1000);
            let mut batched = vec![vec![0f32; rows]; batch];
            {
                let refs: Vec<&QuantVector> = xs.iter().collect();
                let mut outs: Vec<&mut [f32]> = batched.iter_mut().map(Vec::as_mut_slice).collect();
                gemv_batch(&w, &refs, &mut outs);
            }
            for (b, x) in xs.iter().enumerate() {
                let mut alone = vec![0f32; rows];
                gemv_scalar(&w, 0, x, &mut alone);
                assert_eq!(batched[b], alone, "rows {rows} cols {cols} vector {b} of {batch}");
            }
        }
    }

    #[test]
    fn every_kernel_batched_agrees_with_the_scalar_reference() {
        // Row counts around the 4-row block, vector counts around the 4-vector group, column
        // counts around the 64-byte block; the widest weights (+-127) and inputs at full range.
        for (rows, cols, batch) in [(13, 200, 7), (4, 64, 4), (5, 65, 5), (1, 1, 1), (9, 768, 3), (8, 31, 2)] {
            let mut weights = pseudo_random(rows * cols, 3 * rows as u64);
            weights[0] = 1.0; // row 0 quantizes to a full +127 where its max is
            let w = QuantMatrix::quantize(rows, cols, &weights);
            let xs = vectors(batch, cols, 70);
            let refs: Vec<&QuantVector> = xs.iter().collect();
            for kernel in supported_kernels() {
                // Rows 1.. only, so a wrong row offset shows too.
                let mut outs = vec![vec![0f32; rows - 1]; batch];
                let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
                gemv_rows_batch_with(kernel, &w, 1, &refs, &mut slices);
                for (b, x) in xs.iter().enumerate() {
                    let mut alone = vec![0f32; rows - 1];
                    gemv_scalar(&w, 1, x, &mut alone);
                    assert_eq!(outs[b], alone, "{} rows {rows} cols {cols} vector {b} of {batch}", kernel.name());
                }
            }
        }
    }

    #[test]
    fn a_batched_product_splits_across_a_pool_without_changing_a_result() {
        let (rows, cols, batch) = (520, 512, 3); // 260 KiB: above the split threshold
        let w = QuantMatrix::quantize(rows, cols, &pseudo_random(rows * cols, 5));
        let xs = vectors(batch, cols, 50);
        let refs: Vec<&QuantVector> = xs.iter().collect();
        let team = Team::new(3, "test", team::Waiting::Spin).unwrap();
        let mut batched = vec![vec![0f32; rows]; batch];
        team.install(|| {
            let mut outs: Vec<&mut [f32]> = batched.iter_mut().map(Vec::as_mut_slice).collect();
            gemv_batch(&w, &refs, &mut outs);
        });
        for (b, x) in xs.iter().enumerate() {
            let mut alone = vec![0f32; rows];
            gemv_scalar(&w, 0, x, &mut alone);
            assert_eq!(batched[b], alone, "vector {b}");
        }
    }

    #[test]
    fn simd_and_scalar_agree_on_every_shape() {
        // Row counts around the 4-row block; column counts around the 32- and 64-byte bodies.
        for (rows, cols) in
            [(1, 32), (3, 33), (4, 64), (7, 31), (9, 100), (64, 256), (130, 512), (5, 65), (8, 127), (6, 768), (4, 1)]
        {
            let w = QuantMatrix::quantize(rows, cols, &pseudo_random(rows * cols, rows as u64));
            let mut x = QuantVector::default();
            x.set(&pseudo_random(cols, 99));
            let (mut fast, mut slow) = (vec![0f32; rows], vec![0f32; rows]);
            gemv(&w, &x, &mut fast);
            gemv_scalar(&w, 0, &x, &mut slow);
            assert_eq!(fast, slow, "rows {rows} cols {cols}");
            for kernel in supported_kernels() {
                let mut via = vec![0f32; rows];
                gemv_rows_with(kernel, &w, 0, &x, &mut via);
                assert_eq!(via, slow, "{} kernel, rows {rows} cols {cols}", kernel.name());
            }
            // Any row range on its own gives the same rows.
            let first = rows / 3;
            let mut part = vec![0f32; rows - first];
            gemv_rows(&w, first, &x, &mut part);
            assert_eq!(part, slow[first..], "rows {first}.. of {rows}");
            // The prefetch hint changes where the bytes are cached, never the result.
            let streamed = QuantMatrix { streamed: true, ..w.clone() };
            let mut via_stream = vec![0f32; rows];
            gemv(&streamed, &x, &mut via_stream);
            assert_eq!(via_stream, slow, "streamed rows {rows} cols {cols}");
            for kernel in supported_kernels() {
                let mut via = vec![0f32; rows];
                gemv_rows_with(kernel, &streamed, 0, &x, &mut via);
                assert_eq!(via, slow, "{} kernel, streamed rows {rows} cols {cols}", kernel.name());
            }
        }
    }

    #[test]
    fn extreme_values_do_not_saturate_any_kernel() {
        // Every product at +-127 * 127, in sign patterns that make the 16-bit pair sums largest.
        let (rows, cols) = (12, 4096);
        let w: Vec<f32> = (0..rows * cols).map(|i| if (i / 3) % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let x: Vec<f32> = (0..cols).map(|i| if i % 5 == 0 { -1.0 } else { 1.0 }).collect();
        let w = QuantMatrix::quantize(rows, cols, &w);
        let mut xq = QuantVector::default();
        xq.set(&x);
        let mut slow = vec![0f32; rows];
        gemv_scalar(&w, 0, &xq, &mut slow);
        // The other sign of x as a second vector, so a batched kernel sees both patterns at once.
        let mut negated = QuantVector::default();
        negated.set(&x.iter().map(|v| -v).collect::<Vec<f32>>());
        let mut slow_negated = vec![0f32; rows];
        gemv_scalar(&w, 0, &negated, &mut slow_negated);
        for kernel in supported_kernels() {
            let mut via = vec![0f32; rows];
            gemv_rows_with(kernel, &w, 0, &xq, &mut via);
            assert_eq!(via, slow, "{} kernel", kernel.name());
            let mut outs = vec![vec![0f32; rows]; 3];
            let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
            gemv_rows_batch_with(kernel, &w, 0, &[&xq, &negated, &xq], &mut slices);
            assert_eq!(outs, [slow.clone(), slow_negated.clone(), slow.clone()], "{} kernel, batched", kernel.name());
        }
    }

    #[test]
    fn kernels_are_named_and_detected_by_the_cpu() {
        for k in Kernel::ALL {
            assert_eq!(Kernel::from_name(k.name()), Some(k));
        }
        assert_eq!(Kernel::from_name("avx9"), None);
        assert!(Kernel::Scalar.supported());
        let best = Kernel::detect();
        assert!(best.supported());
        // Nothing faster than the detected kernel runs here.
        assert!(Kernel::ALL.iter().take_while(|k| **k != best).all(|k| !k.supported()));
        assert!(supported_names().contains(best.name()));
    }

    #[test]
    fn the_kernel_is_chosen_once_per_process() {
        // The first product (any test) or this select fixes the fastest kernel; changing it later is refused.
        assert_eq!(select(Kernel::detect()), Ok(Kernel::detect()));
        assert_eq!(kernel(), Kernel::detect());
        if Kernel::detect() != Kernel::Scalar {
            let err = select(Kernel::Scalar).unwrap_err();
            assert!(err.contains("already in use"), "{err}");
        }
    }

    #[test]
    fn threads_split_the_rows_without_changing_them() {
        // Large enough to be split, with a row count that leaves a short last part.
        let (rows, cols) = (1030, 96);
        let w = QuantMatrix::quantize(rows, cols, &pseudo_random(rows * cols, 3));
        let mut x = QuantVector::default();
        x.set(&pseudo_random(cols, 4));
        let mut alone = vec![0f32; rows];
        gemv(&w, &x, &mut alone);
        let team = Team::new(3, "test", team::Waiting::Spin).unwrap();
        let mut split = vec![0f32; rows];
        team.install(|| {
            assert_eq!(team::with_current(|t| t.map(Team::threads)), Some(3));
            gemv(&w, &x, &mut split)
        });
        assert_eq!(alone, split);
        assert!(alone.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn quantized_product_is_close_to_fp32() {
        let (rows, cols) = (48, 512);
        let wf = pseudo_random(rows * cols, 7);
        let xf = pseudo_random(cols, 8);
        let w = QuantMatrix::quantize(rows, cols, &wf);
        let mut x = QuantVector::default();
        x.set(&xf);
        let mut y = vec![0f32; rows];
        gemv(&w, &x, &mut y);
        let (mut err, mut norm) = (0f32, 0f32);
        for (r, got) in y.iter().enumerate() {
            let exact: f32 = wf[r * cols..(r + 1) * cols].iter().zip(&xf).map(|(a, b)| a * b).sum();
            err += (got - exact).powi(2);
            norm += exact.powi(2);
        }
        // Two 8-bit roundings per term: about 1% relative error over the output vector.
        let relative = (err / norm).sqrt();
        assert!(relative < 0.03, "relative error {relative}");
    }

    #[test]
    fn quantization_keeps_the_range_symmetric() {
        let mut x = QuantVector::default();
        x.set(&[-2.0, 1.0, 0.0, 2.0]);
        assert_eq!(x.q, vec![-127, 64, 0, 127]);
        assert!((x.scale - 2.0 / 127.0).abs() < 1e-7);
        x.set(&[0.0; 5]);
        assert_eq!(x.q, vec![0; 5]);
    }

    #[test]
    fn norm_softmax_gelu() {
        let mut out = [0f32; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] - 8.0 / rms).abs() < 1e-6);
        let mut p = [1.0f32, 2.0, 3.0];
        softmax(&mut p);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[2] > p[1] && p[1] > p[0]);
        assert_eq!(gelu_new(0.0), 0.0);
        assert!((gelu_new(1.0) - 0.841_192).abs() < 1e-5);
    }

    #[test]
    fn exp_and_gelu_match_libm() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.043; // -86 .. 86
            let (fast, exact) = (exp(x), x.exp());
            assert!(((fast - exact) / exact).abs() < 1e-6, "exp({x}) = {fast}, libm {exact}");
            let reference = 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh());
            assert!((gelu_new(x) - reference).abs() <= 1e-6 * reference.abs().max(1.0), "gelu({x})");
        }
        // Clamped, never 0 or infinite: softmax of extreme scores stays a distribution.
        assert_eq!(exp(-1000.0), exp(-87.3));
        assert!(exp(-1000.0) > 0.0 && exp(1000.0).is_finite());
    }

    /// Rounds to the nearest integer (ties to even) for |v| < 2^22, in two additions: how
    /// `exp` and the quantizer rounded before they read the integer from the first sum's bits.
    fn round_small(v: f32) -> f32 {
        (v + ROUND_MAGIC) - ROUND_MAGIC
    }

    /// `exp` as it was, with 2^n from a float-to-int conversion: the reference that the
    /// integer form must equal to the bit (attention and GELU results must not move).
    fn exp_with_conversion(x: f32) -> f32 {
        let x = x.clamp(-87.3, 88.0);
        let n = round_small(x * std::f32::consts::LOG2_E);
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        (p * r * r + r + 1.0) * f32::from_bits(((n as i32 + 127) << 23) as u32)
    }

    #[test]
    fn exp_is_the_conversion_form_to_the_bit() {
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(exp(x).to_bits(), exp_with_conversion(x).to_bits(), "exp({x})");
            x += 0.0137;
        }
        for x in [-87.3, 88.0, -0.0, 0.5, -0.5, 1e-30, f32::NEG_INFINITY, f32::INFINITY, f32::MIN, f32::MAX] {
            assert_eq!(exp(x).to_bits(), exp_with_conversion(x).to_bits(), "exp({x})");
        }
        assert!(exp(f32::NAN).is_nan());
    }

    /// The quantizer as it was, with a saturating float-to-int conversion: the reference the
    /// wide builds and the bit trick must equal exactly.
    fn quantize_reference(x: &[f32], q: &mut Vec<i8>) -> f32 {
        let amax = abs_max(x);
        q.clear();
        if amax == 0.0 || !amax.is_finite() {
            q.resize(x.len(), 0);
            return if amax.is_finite() { 1.0 } else { f32::NAN };
        }
        let inv = 127.0 / amax;
        q.extend(x.iter().map(|v| round_small((v * inv).clamp(-127.0, 127.0)) as i8));
        amax / 127.0
    }

    #[test]
    fn quantizer_is_the_reference_on_every_build() {
        let mut rows: Vec<Vec<f32>> =
            [0usize, 1, 7, 16, 31, 256, 1000].iter().map(|&n| pseudo_random(n, n as u64)).collect();
        rows.push(vec![0.0; 9]);
        rows.push(vec![1.0, f32::NAN, -0.5, f32::from_bits(0x7fc0_0001), 0.25]); // NaN payloads too
        rows.push(vec![3.0, f32::INFINITY, 1.0]);
        rows.push((0..300).map(|i| (i as f32 - 150.0) * 0.5).collect()); // exact .5 ties
        type Quantizer = fn(&[f32], &mut Vec<i8>) -> f32;
        let mut builds: Vec<(&str, Quantizer)> = vec![("baseline", quantize_body)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                builds.push(("avx2", |x, q| unsafe { quantize_avx2(x, q) }));
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                builds.push(("avx512f", |x, q| unsafe { quantize_avx512(x, q) }));
            }
        }
        for x in &rows {
            let mut want = Vec::new();
            let scale = quantize_reference(x, &mut want);
            for (name, build) in &builds {
                let mut got = vec![5i8; 3]; // cleared and refilled
                assert_eq!(build(x, &mut got).to_bits(), scale.to_bits(), "{name}: scale of {x:?}");
                assert_eq!(got, want, "{name}: {x:?}");
            }
        }
    }

    #[test]
    fn dot_and_abs_max_of_every_length() {
        for n in [0, 1, 7, 8, 9, 31, 64, 100] {
            let (a, b) = (pseudo_random(n, 1), pseudo_random(n, 2));
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            assert!((f64::from(dot(&a, &b)) - naive).abs() < 1e-5, "n {n}");
            let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(abs_max(&a), max, "n {n}");
        }
        assert_eq!(abs_max(&[1.0, f32::NAN, -3.0]), 3.0);
        assert_eq!(abs_max(&[1.0, f32::NEG_INFINITY]), f32::INFINITY);
    }
}
