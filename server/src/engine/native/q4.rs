//! 4-bit weights for the native decoder (`--native-weights q4`): half the bytes of int8 read per
//! decoder step, which is what a step costs once the weights no longer fit the caches.
//!
//! A weight is `q * m[block] * scale[row]`: `q` in [-7, 7], stored as the nibble `u = q + 8`;
//! `m` an integer in [0, 255] per block of 32 columns, the block's range relative to its row's
//! (8-bit "scales of scales", as llama.cpp's k-quants keep 6-bit ones). Rows are packed in
//! chunks of 128 columns, 64 bytes: byte `j` holds column `j` (low nibble) and `j + 64` (high),
//! so one 64-byte load splits into two vectors of 64 weights with no lane shuffles.
//!
//! The product is an exact integer sum, `sum_b m_b * (sum_i u_i x_i - 8 * sum_i x_i)`, scaled
//! once at the end like the int8 kernels, so every SIMD path gives the scalar reference's
//! results bit for bit. Unsigned `u` times signed `x` is what `vpmaddubsw` and `vpdpbusd`
//! multiply natively; the `8 * sum x` term is computed once per block of the input vector.
//! The sum fits i32 for rows up to [`MAX_COLS`] (32 * 15 * 127 * 255 per block); wider
//! matrices, and widths that are not a multiple of 128, stay int8.

use super::kernels::{Kernel, QuantVector};

pub const BLOCK: usize = 32;
/// Columns per packed chunk (64 bytes).
pub const CHUNK: usize = 128;
/// Widest row whose integer sum cannot overflow i32.
pub const MAX_COLS: usize = 4096;

#[derive(Debug, Clone)]
pub struct Q4Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols / 2` bytes, row-major, in chunks of 64 bytes.
    pub packed: Vec<u8>,
    /// `rows * cols / 32` block multipliers.
    pub blocks: Vec<u8>,
    pub scales: Vec<f32>,
}

/// Nibble `u` of column `c` in a row's packed bytes.
fn nibble(packed: &[u8], c: usize) -> u8 {
    let (chunk, j) = (c / CHUNK, c % CHUNK);
    let byte = packed[chunk * CHUNK / 2 + j % (CHUNK / 2)];
    if j < CHUNK / 2 {
        byte & 0x0F
    } else {
        byte >> 4
    }
}

impl Q4Matrix {
    /// Quantizes a row-major fp32 matrix; `None` when its shape does not suit the layout
    /// (columns not a multiple of 128, or more than [`MAX_COLS`]).
    pub fn quantize(rows: usize, cols: usize, w: &[f32]) -> Option<Self> {
        assert_eq!(w.len(), rows * cols, "matrix data does not match its shape");
        if cols == 0 || !cols.is_multiple_of(CHUNK) || cols > MAX_COLS {
            return None;
        }
        let nb = cols / BLOCK;
        let mut packed = vec![0u8; rows * cols / 2];
        let mut blocks = Vec::with_capacity(rows * nb);
        let mut scales = Vec::with_capacity(rows);
        for (row, out) in w.chunks_exact(cols).zip(packed.chunks_exact_mut(cols / 2)) {
            let block_max: Vec<f32> =
                row.chunks_exact(BLOCK).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
            let row_max = block_max.iter().fold(0f32, |m, v| m.max(*v));
            let finite = row_max.is_finite() && row_max > 0.0;
            // One unit of m is row_max / (7 * 255): m = 255 gives the row's largest weight q = 7.
            let unit = if finite { row_max / (7.0 * 255.0) } else { 0.0 };
            scales.push(if finite || row_max == 0.0 { unit.max(f32::MIN_POSITIVE) } else { f32::NAN });
            let ms: Vec<u8> = block_max
                .iter()
                .map(|&amax| if finite { ((amax / row_max) * 255.0).ceil().clamp(0.0, 255.0) as u8 } else { 0 })
                .collect();
            for (c, &v) in row.iter().enumerate() {
                let step = f32::from(ms[c / BLOCK]) * unit;
                let q = if step > 0.0 { (v / step).round().clamp(-7.0, 7.0) as i32 } else { 0 };
                let u = (q + 8) as u8;
                let (chunk, j) = (c / CHUNK, c % CHUNK);
                let byte = &mut out[chunk * CHUNK / 2 + j % (CHUNK / 2)];
                *byte |= if j < CHUNK / 2 { u } else { u << 4 };
            }
            blocks.extend_from_slice(&ms);
        }
        Some(Self { rows, cols, packed, blocks, scales })
    }

    /// Weight (`r`, `c`) as the products see it (tests, and the quantization error).
    pub fn dequantized(&self, r: usize, c: usize) -> f32 {
        let nb = self.cols / BLOCK;
        let u = nibble(&self.packed[r * self.cols / 2..(r + 1) * self.cols / 2], c);
        (i32::from(u) - 8) as f32 * f32::from(self.blocks[r * nb + c / BLOCK]) * self.scales[r]
    }

    pub fn bytes(&self) -> usize {
        self.packed.len() + self.blocks.len() + 4 * self.scales.len()
    }
}

/// `8 * sum x` over each block of 32: the offset of the stored nibbles, taken out once per call.
/// On the stack: this runs for every product of every decoder step.
fn offsets<'a>(x: &QuantVector, out: &'a mut [i32; MAX_COLS / BLOCK]) -> &'a [i32] {
    let blocks = x.q.chunks_exact(BLOCK);
    let n = blocks.len();
    for (o, b) in out.iter_mut().zip(blocks) {
        *o = 8 * b.iter().map(|&v| i32::from(v)).sum::<i32>();
    }
    &out[..n]
}

/// `sum_b m_b * offset_b` of one row.
fn row_offset(ms: &[u8], offsets: &[i32]) -> i32 {
    ms.iter().zip(offsets).map(|(&m, &o)| i32::from(m) * o).sum()
}

/// Rows `first..first + y.len()` of `W x` with a given kernel.
pub fn gemv_rows_with(kernel: Kernel, w: &Q4Matrix, first: usize, x: &QuantVector, y: &mut [f32]) {
    assert_eq!(x.q.len(), w.cols, "vector length does not match the matrix");
    assert!(first + y.len() <= w.rows, "rows out of range");
    assert!(kernel.supported(), "the {} kernel does not run on this CPU", kernel.name());
    let mut buffer = [0i32; MAX_COLS / BLOCK];
    let offsets = offsets(x, &mut buffer);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU supports the kernel's instructions (asserted above); the kernels read
        // rows first..first + y.len() only, asserted in range above, and x's cols bytes.
        unsafe {
            match kernel {
                Kernel::Avx512Vnni => x86::gemv_vnni(w, first, x, offsets, y),
                Kernel::Avx512Bw => x86::gemv_bw(w, first, x, offsets, y),
                Kernel::Avx2 => x86::gemv_avx2(w, first, x, offsets, y),
                Kernel::Scalar => gemv_scalar(w, first, x, offsets, y),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    gemv_scalar(w, first, x, offsets, y);
}

/// Rows `first..first + ys[0].len()` of `W x` for every vector (`ys[i]` for `xs[i]`) with a
/// given kernel, each result bit for bit the one of [`gemv_rows_with`]. AVX2 has a kernel of
/// its own that unpacks each row's nibbles and block multipliers once for up to four vectors
/// (this path's cost is compute, not memory: 4-bit rows come from cache at the speed the
/// products run); the others run their one-vector kernel tile by tile.
pub fn gemv_rows_batch_with(kernel: Kernel, w: &Q4Matrix, first: usize, xs: &[&QuantVector], ys: &mut [&mut [f32]]) {
    super::kernels::check_batch((w.rows, w.cols), first, xs, ys);
    assert!(kernel.supported(), "the {} kernel does not run on this CPU", kernel.name());
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 {
        let mut buffers = [[0i32; MAX_COLS / BLOCK]; x86::VECTORS];
        for (xs, ys) in xs.chunks(x86::VECTORS).zip(ys.chunks_mut(x86::VECTORS)) {
            let mut offs: [&[i32]; x86::VECTORS] = [&[]; x86::VECTORS];
            for ((o, buffer), x) in offs.iter_mut().zip(buffers.iter_mut()).zip(xs) {
                *o = offsets(x, buffer);
            }
            // SAFETY: the CPU runs AVX2 (asserted); rows, vector and output lengths are
            // asserted above, and each vector has its offsets.
            unsafe { x86::gemv_batch_avx2(w, first, xs, &offs[..xs.len()], ys) };
        }
        return;
    }
    let row_bytes = w.cols / 2;
    super::kernels::for_each_tile(row_bytes, xs, ys, |row, x, y| gemv_rows_with(kernel, w, first + row, x, y));
}

/// Rows a batched product takes for about the price of one (draft tokens, as
/// [`Kernel::free_rows`] for int8): AVX2's own batched kernel takes two.
pub fn free_rows(kernel: Kernel) -> usize {
    match kernel {
        Kernel::Avx2 => 2,
        _ => 1,
    }
}

/// The reference every other path is tested against.
fn gemv_scalar(w: &Q4Matrix, first: usize, x: &QuantVector, offsets: &[i32], y: &mut [f32]) {
    let nb = w.cols / BLOCK;
    for (i, out) in y.iter_mut().enumerate() {
        let r = first + i;
        let packed = &w.packed[r * w.cols / 2..(r + 1) * w.cols / 2];
        let ms = &w.blocks[r * nb..(r + 1) * nb];
        let mut sum = 0i32;
        for (b, &m) in ms.iter().enumerate() {
            let block: i32 =
                (b * BLOCK..(b + 1) * BLOCK).map(|c| i32::from(nibble(packed, c)) * i32::from(x.q[c])).sum();
            sum += i32::from(m) * block;
        }
        *out = (sum - row_offset(ms, offsets)) as f32 * (w.scales[r] * x.scale);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Q4Matrix, BLOCK, CHUNK};
    use crate::engine::native::kernels::{avx2_impl::hsum, QuantVector};

    /// `vpshufb` masks that repeat the 16-bit lane `j` of each 128-bit half: block `j`'s m,
    /// from a window of 8 blocks' m, in every 16-bit lane (the `vpmaddwd` multiplier).
    static SPREAD: [[u8; 32]; 8] = {
        let mut out = [[0u8; 32]; 8];
        let mut j = 0;
        while j < 8 {
            let mut b = 0;
            while b < 32 {
                out[j][b] = (2 * j + b % 2) as u8;
                b += 1;
            }
            j += 1;
        }
        out
    };

    /// The m of blocks `b..b + 8` of a row (`b..b + 4` unless `whole`: rows end on a multiple
    /// of 4 blocks), one per byte.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn window_m(ms: *const u8, b: usize, whole: bool) -> __m128i {
        if whole {
            _mm_loadl_epi64(ms.add(b) as *const __m128i)
        } else {
            _mm_cvtsi32_si128(std::ptr::read_unaligned(ms.add(b) as *const i32))
        }
    }

    /// The offsets of blocks `b..b + 8` (`b..b + 4` and zeros unless `whole`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn window_offsets(offsets: &[i32], b: usize, whole: bool) -> __m256i {
        if whole {
            _mm256_loadu_si256(offsets.as_ptr().add(b) as *const __m256i)
        } else {
            _mm256_zextsi128_si256(_mm_loadu_si128(offsets.as_ptr().add(b) as *const __m128i))
        }
    }

    /// Four rows at a time (one load of x's blocks for all four), then one at a time. 32 bytes
    /// of a chunk hold two blocks: b (low nibbles) and b + 2 (high nibbles); each block's
    /// `u * x` pair sums (at most 2 * 15 * 127) are weighed by its m in `vpmaddwd`. The m of 8
    /// blocks are loaded at once and spread with `vpshufb`, and their offsets taken off in one
    /// product, instead of a broadcast per block and a scalar loop per row.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemv_avx2(w: &Q4Matrix, first: usize, x: &QuantVector, offsets: &[i32], y: &mut [f32]) {
        let mut i = 0;
        while i + 4 <= y.len() {
            rows_avx2::<4>(w, first + i, x, offsets, &mut y[i..i + 4]);
            i += 4;
        }
        while i < y.len() {
            rows_avx2::<1>(w, first + i, x, offsets, &mut y[i..i + 1]);
            i += 1;
        }
    }

    /// Rows `first..first + R` into `y` (R entries).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_avx2<const R: usize>(w: &Q4Matrix, first: usize, x: &QuantVector, offsets: &[i32], y: &mut [f32]) {
        let nb = w.cols / BLOCK;
        let row_bytes = w.cols / 2;
        let low = _mm256_set1_epi8(0x0F);
        let end = w.packed.as_ptr().add(w.packed.len());
        let packed: [*const u8; R] = std::array::from_fn(|i| w.packed.as_ptr().add((first + i) * row_bytes));
        let ms: [*const u8; R] = std::array::from_fn(|i| w.blocks.as_ptr().add((first + i) * nb));
        let mut acc = [_mm256_setzero_si256(); R];
        let mut window = [_mm256_setzero_si256(); R];
        for chunk in 0..w.cols / CHUNK {
            let b = 4 * chunk;
            if b.is_multiple_of(8) {
                // The m of the next 8 blocks (4 at the row's end: nb is a multiple of 4), as
                // 16-bit lanes in both halves, and sum m * offset taken off each row's sum.
                let whole = nb - b >= 8;
                let offs = window_offsets(offsets, b, whole);
                for i in 0..R {
                    let m8 = window_m(ms[i], b, whole);
                    window[i] = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(m8));
                    acc[i] = _mm256_sub_epi32(acc[i], _mm256_mullo_epi32(_mm256_cvtepu8_epi32(m8), offs));
                }
            }
            let k = b % 8;
            let xs = x.q.as_ptr().add(b * BLOCK);
            // Blocks b, b + 1 (low nibbles of the two halves) and b + 2, b + 3 (high).
            let xv: [__m256i; 4] = std::array::from_fn(|j| _mm256_loadu_si256(xs.add(j * BLOCK) as *const __m256i));
            let spread: [__m256i; 4] =
                std::array::from_fn(|j| _mm256_loadu_si256(SPREAD[k + j].as_ptr() as *const __m256i));
            for i in 0..R {
                // Four rows ahead, as the int8 kernels do: L3 latency otherwise stalls each row.
                let ahead = packed[i].wrapping_add(4 * row_bytes + chunk * CHUNK / 2);
                if ahead < end {
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                }
                for half in 0..2 {
                    let bytes = _mm256_loadu_si256(packed[i].add(chunk * CHUNK / 2 + half * BLOCK) as *const __m256i);
                    let wl = _mm256_and_si256(bytes, low);
                    let wh = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
                    let ml = _mm256_shuffle_epi8(window[i], spread[half]);
                    let mh = _mm256_shuffle_epi8(window[i], spread[half + 2]);
                    let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(wl, xv[half]), ml);
                    let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(wh, xv[half + 2]), mh);
                    acc[i] = _mm256_add_epi32(acc[i], _mm256_add_epi32(pl, ph));
                }
            }
        }
        for (i, out) in y.iter_mut().enumerate() {
            *out = hsum(acc[i]) as f32 * (w.scales[first + i] * x.scale);
        }
    }

    /// Vectors per pass of [`gemv_batch_avx2`]: four sums and a row's unpacked weights fit
    /// the sixteen registers.
    pub const VECTORS: usize = 4;

    /// Up to [`VECTORS`] vectors, row by row: each 32 bytes of a row are unpacked and their two
    /// blocks' m spread once, then multiplied with every vector, whose sums are the one-vector
    /// kernel's exact integers.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemv_batch_avx2(
        w: &Q4Matrix,
        first: usize,
        xs: &[&QuantVector],
        offsets: &[&[i32]],
        ys: &mut [&mut [f32]],
    ) {
        match xs.len() {
            4 => batch_rows_avx2::<4>(w, first, xs, offsets, ys),
            3 => batch_rows_avx2::<3>(w, first, xs, offsets, ys),
            2 => batch_rows_avx2::<2>(w, first, xs, offsets, ys),
            1 => gemv_avx2(w, first, xs[0], offsets[0], ys[0]),
            _ => {}
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn batch_rows_avx2<const N: usize>(
        w: &Q4Matrix,
        first: usize,
        xs: &[&QuantVector],
        offsets: &[&[i32]],
        ys: &mut [&mut [f32]],
    ) {
        let nb = w.cols / BLOCK;
        let row_bytes = w.cols / 2;
        let low = _mm256_set1_epi8(0x0F);
        let end = w.packed.as_ptr().add(w.packed.len());
        let rows = ys[0].len();
        for i in 0..rows {
            let r = first + i;
            let packed = w.packed.as_ptr().add(r * row_bytes);
            let ms = w.blocks.as_ptr().add(r * nb);
            let mut acc = [_mm256_setzero_si256(); N];
            let mut window = _mm256_setzero_si256();
            for chunk in 0..w.cols / CHUNK {
                let b = 4 * chunk;
                if b.is_multiple_of(8) {
                    let whole = nb - b >= 8;
                    let m8 = window_m(ms, b, whole);
                    window = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(m8));
                    let m32 = _mm256_cvtepu8_epi32(m8);
                    for (a, o) in acc.iter_mut().zip(offsets) {
                        *a = _mm256_sub_epi32(*a, _mm256_mullo_epi32(m32, window_offsets(o, b, whole)));
                    }
                }
                let k = b % 8;
                let ahead = packed.wrapping_add(row_bytes + chunk * CHUNK / 2);
                if ahead < end {
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                }
                for half in 0..2 {
                    let bytes = _mm256_loadu_si256(packed.add(chunk * CHUNK / 2 + half * BLOCK) as *const __m256i);
                    let wl = _mm256_and_si256(bytes, low);
                    let wh = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
                    let ml =
                        _mm256_shuffle_epi8(window, _mm256_loadu_si256(SPREAD[k + half].as_ptr() as *const __m256i));
                    let mh = _mm256_shuffle_epi8(
                        window,
                        _mm256_loadu_si256(SPREAD[k + half + 2].as_ptr() as *const __m256i),
                    );
                    for (a, x) in acc.iter_mut().zip(xs) {
                        let xl = _mm256_loadu_si256(x.q.as_ptr().add((b + half) * BLOCK) as *const __m256i);
                        let xh = _mm256_loadu_si256(x.q.as_ptr().add((b + half + 2) * BLOCK) as *const __m256i);
                        let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(wl, xl), ml);
                        let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(wh, xh), mh);
                        *a = _mm256_add_epi32(*a, _mm256_add_epi32(pl, ph));
                    }
                }
            }
            for ((a, x), y) in acc.iter().zip(xs).zip(ys.iter_mut()) {
                y[i] = hsum(*a) as f32 * (w.scales[r] * x.scale);
            }
        }
    }

    /// `vpermd` indices that put the m of blocks (k, k + 1) of a 16-block window in lanes
    /// 0-7 and 8-15, for k = 0, 2, .., 14.
    static PAIRS: [[i32; 16]; 8] = {
        let mut out = [[0i32; 16]; 8];
        let mut p = 0;
        while p < 8 {
            let mut lane = 0;
            while lane < 16 {
                out[p][lane] = 2 * p as i32 + (lane / 8) as i32;
                lane += 1;
            }
            p += 1;
        }
        out
    };

    macro_rules! gemv_avx512 {
        ($name:ident, $features:literal, $weigh:ident) => {
            /// One 64-byte load is 128 weights: low nibbles are blocks (b, b + 1), high nibbles
            /// (b + 2, b + 3), each 32-bit lane inside one block; the unsigned-by-signed
            /// products are weighed by their block's m on the way (`vpmaddwd`). Per window of
            /// 16 blocks, their m times their offsets is taken off the sum in one product.
            #[target_feature(enable = $features)]
            pub unsafe fn $name(w: &Q4Matrix, first: usize, x: &QuantVector, offsets: &[i32], y: &mut [f32]) {
                let nb = w.cols / BLOCK;
                let low = _mm512_set1_epi8(0x0F);
                let end = w.packed.as_ptr().add(w.packed.len());
                for (i, out) in y.iter_mut().enumerate() {
                    let r = first + i;
                    let packed = w.packed.as_ptr().add(r * w.cols / 2);
                    let ms = w.blocks.as_ptr().add(r * nb);
                    let mut acc = _mm512_setzero_si512();
                    let mut window = _mm512_setzero_si512();
                    for chunk in 0..w.cols / CHUNK {
                        let b = 4 * chunk;
                        if b.is_multiple_of(16) {
                            // The m of the next 16 blocks (fewer at the row's end), one per i32
                            // lane, and their offsets taken off at once.
                            let take = (nb - b).min(16);
                            let lanes: __mmask16 = if take == 16 { !0 } else { (1u16 << take) - 1 };
                            window = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, ms.add(b) as *const i8));
                            let offs = _mm512_maskz_loadu_epi32(lanes, offsets.as_ptr().add(b));
                            acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(window, offs));
                        }
                        let k = (b % 16) / 2;
                        // Four rows ahead, as the int8 kernels do: L3 latency otherwise stalls each row.
                        let ahead = packed.wrapping_add(4 * w.cols / 2 + chunk * CHUNK / 2);
                        if ahead < end {
                            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                        }
                        let bytes = _mm512_loadu_si512(packed.add(chunk * CHUNK / 2) as *const __m512i);
                        let wl = _mm512_and_si512(bytes, low);
                        let wh = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
                        let xl = _mm512_loadu_si512(x.q.as_ptr().add(b * BLOCK) as *const __m512i);
                        let xh = _mm512_loadu_si512(x.q.as_ptr().add((b + 2) * BLOCK) as *const __m512i);
                        let ml =
                            _mm512_permutexvar_epi32(_mm512_loadu_si512(PAIRS[k].as_ptr() as *const __m512i), window);
                        let mh = _mm512_permutexvar_epi32(
                            _mm512_loadu_si512(PAIRS[k + 1].as_ptr() as *const __m512i),
                            window,
                        );
                        acc = _mm512_add_epi32(acc, _mm512_add_epi32($weigh(wl, xl, ml), $weigh(wh, xh, mh)));
                    }
                    *out = _mm512_reduce_add_epi32(acc) as f32 * (w.scales[r] * x.scale);
                }
            }
        };
    }

    /// VNNI: four products per i32 lane (at most 4 * 15 * 127, so the lane's high 16 bits are
    /// its sign), then times m (the lane's low 16 bits; high 16 zero) with one `vpmaddwd`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn weigh_vnni(w: __m512i, x: __m512i, m: __m512i) -> __m512i {
        _mm512_madd_epi16(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x), m)
    }

    /// BW: pair sums (at most 2 * 15 * 127) in i16, then `vpmaddwd` against m in both halves.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn weigh_bw(w: __m512i, x: __m512i, m: __m512i) -> __m512i {
        _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_or_si512(m, _mm512_slli_epi32(m, 16)))
    }

    gemv_avx512!(gemv_vnni, "avx512f,avx512bw,avx512vl,avx512vnni", weigh_vnni);
    gemv_avx512!(gemv_bw, "avx512f,avx512bw,avx512vl", weigh_bw);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::native::kernels::testing::{pseudo_random, supported_kernels};

    #[test]
    fn every_kernel_gives_the_scalar_results_bit_for_bit() {
        // Block counts that fill and that cut the AVX-512 path's window of 16 multipliers, row
        // ranges that start mid-matrix.
        for (rows, cols) in [(1, 128), (3, 256), (5, 384), (8, 512), (3, 640), (7, 768), (2, 2048), (4, 4096)] {
            let w = Q4Matrix::quantize(rows, cols, &pseudo_random(rows * cols, cols as u64)).unwrap();
            let mut x = QuantVector::default();
            x.set(&pseudo_random(cols, 5));
            let mut slow = vec![0f32; rows];
            gemv_rows_with(Kernel::Scalar, &w, 0, &x, &mut slow);
            assert!(slow.iter().any(|v| *v != 0.0));
            for kernel in supported_kernels() {
                let mut via = vec![0f32; rows];
                gemv_rows_with(kernel, &w, 0, &x, &mut via);
                assert_eq!(via, slow, "{} kernel, rows {rows} cols {cols}", kernel.name());
                let first = rows / 2;
                let mut part = vec![0f32; rows - first];
                gemv_rows_with(kernel, &w, first, &x, &mut part);
                assert_eq!(part, slow[first..], "{} kernel, rows {first}..{rows}", kernel.name());
            }
        }
    }

    #[test]
    fn batched_products_give_each_vectors_scalar_results_bit_for_bit() {
        // Vector counts below, at and past a pass of four; widths with a short last window of
        // multipliers (384, 640); row ranges that start mid-matrix.
        for (rows, cols) in [(1, 128), (5, 384), (8, 512), (7, 640)] {
            let w = Q4Matrix::quantize(rows, cols, &pseudo_random(rows * cols, cols as u64 + 3)).unwrap();
            let xs: Vec<QuantVector> = (0..9)
                .map(|i| {
                    let mut x = QuantVector::default();
                    x.set(&pseudo_random(cols, 100 + i));
                    x
                })
                .collect();
            for n in 1..=xs.len() {
                let refs: Vec<&QuantVector> = xs[..n].iter().collect();
                for first in [0, rows / 2] {
                    let mut expected = vec![vec![0f32; rows - first]; n];
                    for (x, y) in refs.iter().zip(expected.iter_mut()) {
                        gemv_rows_with(Kernel::Scalar, &w, first, x, y);
                    }
                    for kernel in supported_kernels() {
                        let mut got = vec![vec![0f32; rows - first]; n];
                        let mut ys: Vec<&mut [f32]> = got.iter_mut().map(|y| y.as_mut_slice()).collect();
                        gemv_rows_batch_with(kernel, &w, first, &refs, &mut ys);
                        assert_eq!(
                            got,
                            expected,
                            "{} kernel, {n} vectors, rows {first}..{rows}, cols {cols}",
                            kernel.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_widest_rows_at_full_range_do_not_overflow() {
        // Every weight and input at the extremes, in sign patterns that agree: the largest sum.
        let (rows, cols) = (3, MAX_COLS);
        let w: Vec<f32> = (0..rows * cols).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let xf: Vec<f32> = (0..cols).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let w = Q4Matrix::quantize(rows, cols, &w).unwrap();
        let mut x = QuantVector::default();
        x.set(&xf);
        let mut slow = vec![0f32; rows];
        gemv_rows_with(Kernel::Scalar, &w, 0, &x, &mut slow);
        // Exact: every product is 7 * 255 * 127 units, all positive.
        let expected = (cols as f64 * 7.0 * 255.0 * 127.0) as f32 * (w.scales[0] * x.scale);
        assert_eq!(slow[0], expected);
        for kernel in supported_kernels() {
            let mut via = vec![0f32; rows];
            gemv_rows_with(kernel, &w, 0, &x, &mut via);
            assert_eq!(via, slow, "{} kernel", kernel.name());
        }
    }

    #[test]
    fn each_weight_is_within_half_a_step_of_its_value() {
        let (rows, cols) = (6, 256);
        let mut wf = pseudo_random(rows * cols, 11);
        wf[40] = 9.0; // one outlier: its block gets m = 255, the others keep their own range
        let w = Q4Matrix::quantize(rows, cols, &wf).unwrap();
        let nb = cols / BLOCK;
        for r in 0..rows {
            for c in 0..cols {
                let step = f32::from(w.blocks[r * nb + c / BLOCK]) * w.scales[r];
                let err = (w.dequantized(r, c) - wf[r * cols + c]).abs();
                assert!(err <= step / 2.0 + 1e-6, "({r}, {c}): error {err}, step {step}");
            }
        }
        assert_eq!(w.blocks[1], 255);
        assert!(w.blocks[0..nb].iter().filter(|&&m| m < 60).count() >= nb - 1, "{:?}", &w.blocks[0..nb]);
    }

    #[test]
    fn the_product_is_close_to_fp32() {
        let (rows, cols) = (48, 512);
        let (wf, xf) = (pseudo_random(rows * cols, 7), pseudo_random(cols, 8));
        let w = Q4Matrix::quantize(rows, cols, &wf).unwrap();
        let mut x = QuantVector::default();
        x.set(&xf);
        let mut y = vec![0f32; rows];
        gemv_rows_with(Kernel::Scalar, &w, 0, &x, &mut y);
        let (mut err, mut norm) = (0f32, 0f32);
        for (r, got) in y.iter().enumerate() {
            let exact: f32 = wf[r * cols..(r + 1) * cols].iter().zip(&xf).map(|(a, b)| a * b).sum();
            err += (got - exact).powi(2);
            norm += exact.powi(2);
        }
        // 15 levels per weight: about 8% relative error on uniform weights.
        let relative = (err / norm).sqrt();
        assert!(relative < 0.12, "relative error {relative}");
    }

    #[test]
    fn shapes_the_layout_cannot_hold_are_refused() {
        assert!(Q4Matrix::quantize(2, 48, &[0.0; 96]).is_none());
        assert!(Q4Matrix::quantize(1, 192, &[0.0; 192]).is_none());
        assert!(Q4Matrix::quantize(1, MAX_COLS + BLOCK, &vec![0.0; MAX_COLS + BLOCK]).is_none());
        let zero = Q4Matrix::quantize(2, 128, &[0.0; 256]).unwrap();
        let mut x = QuantVector::default();
        x.set(&[1.0; 128]);
        let mut y = vec![1f32; 2];
        gemv_rows_with(Kernel::Scalar, &zero, 0, &x, &mut y);
        assert_eq!(y, vec![0.0, 0.0]);
    }
}
