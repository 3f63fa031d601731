//! The patched burn-flex (third_party/burn-flex) against plain indexing: binary ops on broadcast,
//! permuted and sliced operands, and copies of permuted tensors to contiguous memory, the paths
//! the patch walks a row at a time.

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};

const SHAPE: [usize; 4] = [2, 3, 4, 5];

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Distinct, exactly representable values, so any misplaced element shows.
fn values(n: usize, salt: f32) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.5 + salt).collect()
}

fn tensor(v: &[f32], shape: [usize; 4]) -> Tensor<Flex, 4> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), &Default::default())
}

fn read(t: Tensor<Flex, 4>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

/// Every index of `shape`, row-major.
fn indices(shape: [usize; 4]) -> impl Iterator<Item = [usize; 4]> {
    let n: usize = shape.iter().product();
    let st = strides(&shape);
    (0..n).map(move |i| std::array::from_fn(|d| (i / st[d]) % shape[d]))
}

/// The element of a row-major `[..]` buffer of `shape` at `idx`, with size-1 dims broadcast.
fn at(v: &[f32], shape: [usize; 4], idx: [usize; 4]) -> f32 {
    let st = strides(&shape);
    v[(0..4)
        .map(|d| if shape[d] == 1 { 0 } else { idx[d] * st[d] })
        .sum::<usize>()]
}

#[test]
fn binary_ops_on_broadcast_and_permuted_operands_match_indexing() {
    let full = values(120, 1.0);
    // Broadcast shapes on either side, in the middle and at the ends.
    for small in [
        [2, 1, 4, 1],
        [1, 3, 1, 5],
        [1, 1, 4, 5],
        [2, 3, 1, 1],
        [2, 1, 1, 5],
    ] {
        let sv = values(small.iter().product(), 0.25);
        for swap in [false, true] {
            let (a, b) = (tensor(&full, SHAPE), tensor(&sv, small));
            let (got, want): (Vec<f32>, Vec<f32>) = if swap {
                // Broadcast operand on the left: the non-commutative op shows a swap.
                let w = indices(SHAPE)
                    .map(|i| at(&sv, small, i) - at(&full, SHAPE, i))
                    .collect();
                (read(b - a), w)
            } else {
                let w = indices(SHAPE)
                    .map(|i| at(&full, SHAPE, i) / at(&sv, small, i))
                    .collect();
                (read(a / b), w)
            };
            assert_eq!(
                got, want,
                "broadcast {small:?}, broadcast on the left: {swap}"
            );
        }
    }
    // Both operands permuted (no contiguous row in either), and a sliced one.
    let a = tensor(&full, SHAPE).swap_dims(1, 2); // [2, 4, 3, 5]
    let b = tensor(&values(120, 0.75), [2, 5, 4, 3]).permute([0, 2, 3, 1]); // [2, 4, 3, 5]
    let (av, bv) = (read(a.clone()), read(b.clone()));
    let want: Vec<f32> = av.iter().zip(&bv).map(|(x, y)| x - y).collect();
    assert_eq!(read(a.clone() - b), want);
    let c = tensor(&values(2 * 4 * 6 * 5, 3.0), [2, 4, 6, 5]).slice([0..2, 0..4, 2..5, 0..5]);
    let cv = read(c.clone());
    let want: Vec<f32> = av.iter().zip(&cv).map(|(x, y)| x * y).collect();
    assert_eq!(read(a * c), want);
}

#[test]
fn permuted_tensors_copy_to_the_right_order() {
    let v = values(120, 0.0);
    // [2, 3, 4, 5] → [2, 4, 3, 5] (a head transpose), then reshaped: copied to contiguous.
    let t = tensor(&v, SHAPE).swap_dims(1, 2).reshape([8, 15]);
    let got: Vec<f32> = t.into_data().to_vec().unwrap();
    let want: Vec<f32> = indices([2, 4, 3, 5])
        .map(|[a, b, c, d]| at(&v, SHAPE, [a, c, b, d]))
        .collect();
    assert_eq!(got, want);
    // Flipped too (negative strides where the backend flips by layout).
    let t = tensor(&v, SHAPE).flip([3]).swap_dims(1, 2).reshape([8, 15]);
    let got: Vec<f32> = t.into_data().to_vec().unwrap();
    let want: Vec<f32> = indices([2, 4, 3, 5])
        .map(|[a, b, c, d]| at(&v, SHAPE, [a, c, b, 4 - d]))
        .collect();
    assert_eq!(got, want);
    // Large enough to be split across threads (the copy runs in tasks of rows).
    let n = [4, 64, 8, 64];
    let big: Vec<f32> = (0..n.iter().product::<usize>()).map(|i| i as f32).collect();
    let t = tensor(&big, n).swap_dims(1, 2).reshape([4 * 8, 64 * 64]);
    let got: Vec<f32> = t.into_data().to_vec().unwrap();
    let want: Vec<f32> = indices([4, 8, 64, 64])
        .map(|[a, b, c, d]| at(&big, n, [a, c, b, d]))
        .collect();
    assert_eq!(got, want);
    // A large broadcast binary op (threads too): [4, 8, 64, 64] + [4, 1, 64, 1] on the left.
    let m: Vec<f32> = (0..4 * 64).map(|i| i as f32 * 0.5).collect();
    let n2 = [4, 8, 64, 64];
    let x = tensor(&big, n2);
    let s = tensor(&m, [4, 1, 64, 1]);
    let got = read(s - x);
    let want: Vec<f32> = indices(n2)
        .map(|i| at(&m, [4, 1, 64, 1], i) - at(&big, n2, i))
        .collect();
    assert_eq!(got, want);
}
