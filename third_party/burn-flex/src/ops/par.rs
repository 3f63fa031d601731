//! pali patch: element-wise loops on rayon's pool from a size where splitting pays on two cores.
//!
//! Upstream runs these loops on one thread (unary and scalar ops always, binary ops below 4 M
//! elements), which left a training step of activations of ~1 M elements mostly serial.
//! Every element is computed by the same expression as before, so results are bit-identical.

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
