//! Adam's update of one parameter in one pass over its elements, on the CPU backend (flex).
//!
//! Written with tensor ops ([`crate::optim::step`]) the update is 12 passes over each
//! parameter's elements, each a separate loop over memory: a quarter of a 63 M-parameter CPU
//! step. Here every element goes through the same f32 expressions in the same order (so the
//! weights and moments are bit-identical to the tensor ops'), in one loop on rayon's pool.
//! Other backends keep the tensor ops, which their fusion compiles into few kernels.

use std::any::{Any, TypeId};

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Elements per task.
const CHUNK: usize = 16 * 1024;

/// Whether `B`'s tensors are flex tensors (then [`adam`] applies to f32 parameters).
pub fn available<B: Backend>() -> bool {
    #[cfg(test)]
    if TENSOR_OPS.with(|c| c.get()) {
        return false;
    }
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>()
}

#[cfg(test)]
thread_local! {
    /// Tests set it to take the tensor ops on flex too, to compare both.
    pub static TENSOR_OPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The scalars of one parameter's update, as the tensor ops use them (f32).
pub struct Scalars {
    pub b1: f32,
    pub b2: f32,
    /// ε·√(1 − β₂ᵗ).
    pub eps: f32,
    /// s·mult·lr·√(1 − β₂ᵗ) / (1 − β₁ᵗ).
    pub alpha: f32,
    /// 1 − s·mult·wd, or None without weight decay.
    pub decay: Option<f32>,
}

/// The updated parameter, moments and (with `norms`) Σ (p − p')².
pub struct Update<B: Backend> {
    pub param: Tensor<B, 1>,
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
    pub update_sq: Option<f64>,
}

fn into_flex<B: Backend>(t: Tensor<B, 1>) -> FlexTensor {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => *(Box::new(p) as Box<dyn Any>)
            .downcast::<FlexTensor>()
            .expect("fused Adam called on a backend other than flex"),
        TensorPrimitive::QFloat(_) => panic!("fused Adam called on a quantized tensor"),
    }
}

fn from_flex<B: Backend>(t: FlexTensor) -> Tensor<B, 1> {
    let p = (Box::new(t) as Box<dyn Any>)
        .downcast::<B::FloatTensorPrimitive>()
        .expect("checked by available()");
    Tensor::from_primitive(TensorPrimitive::Float(*p))
}

/// A flat f32 flex tensor whose storage is exactly its values (copied only when strided).
fn flat<B: Backend>(t: Tensor<B, 1>) -> FlexTensor {
    let t = into_flex(t);
    assert_eq!(
        t.dtype(),
        DType::F32,
        "fused Adam called on a non-f32 tensor"
    );
    let c = t.to_contiguous();
    drop(t); // so that `c` is the storage's only owner when `t` was
    c
}

/// One scalar of a `[1]` tensor (flex: read from memory, no device transfer).
fn scalar<B: Backend>(t: Tensor<B, 1>) -> f32 {
    flat(t).storage::<f32>()[0]
}

/// Adam for parameter `p` with gradient `g`, stored moments `mv` (none on the first step), the
/// clip-folded input scales `c1` = (1 − β₁)·c and `c2` = (1 − β₂)·c², and `applied` (false
/// when the step is not finite: the parameter keeps its value). Call it only when
/// [`available`] and every tensor is f32.
#[allow(clippy::too_many_arguments)]
pub fn adam<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    mv: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    c1: &Tensor<B, 1>,
    c2: &Tensor<B, 1>,
    applied: &Tensor<B, 1, Bool>,
    s: Scalars,
    norms: bool,
) -> Update<B> {
    let (c1, c2) = (scalar(c1.clone()), scalar(c2.clone()));
    let keep = scalar(applied.clone().float()) == 0.0;
    // The parameter and the moments are updated in place (copied first only if something
    // else holds them: a caller that keeps the old weights still has them).
    let mut p = flat(p);
    let g = flat(g);
    let n = g.storage::<f32>().len();
    let (mut m, mut v, first) = match mv {
        Some((m, v)) => (flat(m), flat(v), false),
        None => {
            let z = || FlexTensor::zeros(Shape::new([n]), DType::F32);
            (z(), z(), true)
        }
    };
    assert!(
        [&p, &m, &v].iter().all(|t| t.storage::<f32>().len() == n),
        "fused Adam: parameter, gradient and moments differ in size"
    );
    let (b1, b2, eps, alpha) = (s.b1, s.b2, s.eps, s.alpha);
    // The tensor ops' expressions, term by term: g·c1 and (g·g)·c2 first.
    let moments = |gi: f32, m: f32, v: f32| {
        let (gm, gv) = (gi * c1, (gi * gi) * c2);
        if first {
            (gm, gv)
        } else {
            (m * b1 + gm, v * b2 + gv)
        }
    };
    if keep {
        // A skipped step: the moments take the gradient, the parameter is left as it is
        // (not even copied when shared).
        m.storage_mut::<f32>()
            .par_chunks_mut(CHUNK)
            .zip(v.storage_mut::<f32>().par_chunks_mut(CHUNK))
            .zip(g.storage::<f32>().par_chunks(CHUNK))
            .for_each(|((m, v), g)| {
                for i in 0..m.len() {
                    (m[i], v[i]) = moments(g[i], m[i], v[i]);
                }
            });
        return Update {
            param: from_flex(p),
            m: from_flex(m),
            v: from_flex(v),
            update_sq: norms.then_some(0.0),
        };
    }
    // Per-chunk sums collected in chunk order and added serially: the update norm does not
    // depend on how rayon splits the work.
    let sq: Vec<f64> = p
        .storage_mut::<f32>()
        .par_chunks_mut(CHUNK)
        .zip(m.storage_mut::<f32>().par_chunks_mut(CHUNK))
        .zip(v.storage_mut::<f32>().par_chunks_mut(CHUNK))
        .zip(g.storage::<f32>().par_chunks(CHUNK))
        .map(|(((p, m), v), g)| {
            let mut sq = 0f64;
            for i in 0..p.len() {
                let pi = p[i];
                let (mi, vi) = moments(g[i], m[i], v[i]);
                m[i] = mi;
                v[i] = vi;
                let step = (mi / (vi.sqrt() + eps)) * alpha;
                let decayed = match s.decay {
                    Some(d) => pi * d,
                    None => pi,
                };
                let new = decayed - step;
                p[i] = new;
                if norms {
                    let u = (pi - new) as f64;
                    sq += u * u;
                }
            }
            sq
        })
        .collect();
    let sq: f64 = sq.iter().sum();
    Update {
        param: from_flex(p),
        m: from_flex(m),
        v: from_flex(v),
        update_sq: norms.then_some(sq),
    }
}
