//! pali patch: element-wise loops on rayon's pool from a size where splitting pays on two cores.
//!
//! Upstream runs these loops on one thread (unary and scalar ops always, binary ops below 4 M
//! elements), which left a training step of activations of ~1 M elements mostly serial.
//! Every element is computed by the same expression as before, so results are bit-identical.

use crate::layout::Layout;
use crate::strided_index::Rows;

/// Smallest slice split across threads.
pub(crate) const THRESHOLD: usize = 32 * 1024;
/// Elements per task.
#[cfg(feature = "rayon")]
const CHUNK: usize = 8 * 1024;

#[inline]
pub(crate) fn map_inplace<E, F>(xs: &mut [E], f: F)
where
    E: Copy + Send + Sync,
    F: Fn(E) -> E + Sync + Send,
{
    #[cfg(feature = "rayon")]
    if xs.len() >= THRESHOLD {
        use rayon::prelude::*;
        xs.par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|x| *x = f(*x)));
        return;
    }
    xs.iter_mut().for_each(|x| *x = f(*x));
}

#[inline]
pub(crate) fn zip_inplace<E, F>(xs: &mut [E], ys: &[E], f: F)
where
    E: Copy + Send + Sync,
    F: Fn(E, E) -> E + Sync + Send,
{
    #[cfg(feature = "rayon")]
    if xs.len() >= THRESHOLD {
        use rayon::prelude::*;
        xs.par_chunks_mut(CHUNK)
            .zip(ys.par_chunks(CHUNK))
            .for_each(|(c, d)| c.iter_mut().zip(d).for_each(|(x, &y)| *x = f(*x, y)));
        return;
    }
    xs.iter_mut().zip(ys).for_each(|(x, &y)| *x = f(*x, y));
}

#[inline]
pub(crate) fn map<E, R, F>(xs: &[E], f: F) -> alloc::vec::Vec<R>
where
    E: Copy + Send + Sync,
    R: Send,
    F: Fn(E) -> R + Sync + Send,
{
    #[cfg(feature = "rayon")]
    if xs.len() >= THRESHOLD {
        use rayon::prelude::*;
        return xs.par_iter().with_min_len(CHUNK).map(|&x| f(x)).collect();
    }
    xs.iter().map(|&x| f(x)).collect()
}

#[inline]
pub(crate) fn zip<E, R, F>(xs: &[E], ys: &[E], f: F) -> alloc::vec::Vec<R>
where
    E: Copy + Send + Sync,
    R: Send,
    F: Fn(E, E) -> R + Sync + Send,
{
    #[cfg(feature = "rayon")]
    if xs.len() >= THRESHOLD {
        use rayon::prelude::*;
        return xs
            .par_iter()
            .with_min_len(CHUNK)
            .zip(ys.par_iter())
            .map(|(&x, &y)| f(x, y))
            .collect();
    }
    xs.iter().zip(ys).map(|(&x, &y)| f(x, y)).collect()
}

/// `op` over two layouts of one shape (broadcast, permuted, sliced), a row at a time
/// ([`Rows`]): the result in row-major order, as `StridedIter` gave it element by element.
pub(crate) fn zip_rows<E, Op>(
    lhs: &[E],
    lhs_layout: &Layout,
    rhs: &[E],
    rhs_layout: &Layout,
    op: Op,
) -> alloc::vec::Vec<E>
where
    E: bytemuck::Pod + Send + Sync,
    Op: Fn(E, E) -> E + Sync + Send,
{
    let rows = Rows::new(
        lhs_layout.shape(),
        [
            (lhs_layout.strides(), lhs_layout.start_offset() as isize),
            (rhs_layout.strides(), rhs_layout.start_offset() as isize),
        ],
    );
    let [ls, rs] = rows.row_strides;
    collect_rows(&rows, |d: &mut [E], [lo, ro]| {
        let (n, lo, ro) = (d.len(), lo as usize, ro as usize);
        match (ls, rs) {
            (1, 1) => {
                for ((d, &a), &b) in d.iter_mut().zip(&lhs[lo..lo + n]).zip(&rhs[ro..ro + n]) {
                    *d = op(a, b);
                }
            }
            (1, 0) => {
                let b = rhs[ro];
                for (d, &a) in d.iter_mut().zip(&lhs[lo..lo + n]) {
                    *d = op(a, b);
                }
            }
            (0, 1) => {
                let a = lhs[lo];
                for (d, &b) in d.iter_mut().zip(&rhs[ro..ro + n]) {
                    *d = op(a, b);
                }
            }
            _ => {
                for (j, d) in d.iter_mut().enumerate() {
                    let li = (lo as isize + j as isize * ls) as usize;
                    let ri = (ro as isize + j as isize * rs) as usize;
                    *d = op(lhs[li], rhs[ri]);
                }
            }
        }
    })
}

/// A strided layout's values copied to row-major order, a row at a time ([`Rows`]).
pub(crate) fn copy_rows<E>(src: &[E], layout: &Layout) -> alloc::vec::Vec<E>
where
    E: bytemuck::Pod + Send + Sync,
{
    let rows = Rows::new(
        layout.shape(),
        [(layout.strides(), layout.start_offset() as isize)],
    );
    let [st] = rows.row_strides;
    collect_rows(&rows, |d: &mut [E], [o]| {
        if st == 1 {
            d.copy_from_slice(&src[o as usize..o as usize + d.len()]);
        } else {
            for (j, d) in d.iter_mut().enumerate() {
                *d = src[(o + j as isize * st) as usize];
            }
        }
    })
}

/// The row-major output of `rows`, each row written by `row(dst, offsets)`; rows are split
/// across rayon's pool in tasks of about `CHUNK` elements from `THRESHOLD` elements.
fn collect_rows<E, const N: usize>(
    rows: &Rows<N>,
    row: impl Fn(&mut [E], [isize; N]) + Sync,
) -> alloc::vec::Vec<E>
where
    E: bytemuck::Pod + Send + Sync,
{
    let n = rows.row_len;
    let total = n * rows.num_rows();
    let mut out = alloc::vec![E::zeroed(); total];
    if total == 0 {
        return out;
    }
    let fill = |dst: &mut [E], first_row: usize| {
        let count = dst.len() / n;
        let mut chunks = dst.chunks_exact_mut(n);
        rows.for_each(first_row, first_row + count, |off| {
            row(chunks.next().expect("one chunk per row"), off)
        });
    };
    #[cfg(feature = "rayon")]
    if total >= THRESHOLD {
        use rayon::prelude::*;
        let rows_per_task = (CHUNK / n).max(1);
        out.par_chunks_mut(rows_per_task * n)
            .enumerate()
            .for_each(|(t, dst)| fill(dst, t * rows_per_task));
        return out;
    }
    fill(&mut out, 0);
    out
}
