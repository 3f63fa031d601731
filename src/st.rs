//! Writing named f32/i64 tensors to a safetensors file, atomically.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

#[derive(Default)]
pub struct Writer {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl Writer {
    pub fn f32(&mut self, name: &str, shape: Vec<usize>, vals: &[f32]) {
        let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.push((name.into(), Dtype::F32, shape, bytes));
    }
    pub fn i64(&mut self, name: &str, shape: Vec<usize>, vals: &[i64]) {
        let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.push((name.into(), Dtype::I64, shape, bytes));
    }
    pub fn write(&self, path: &Path) -> Result<()> {
        let views = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
            .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let tmp = path.with_extension("tmp");
        safetensors::tensor::serialize_to_file(views, Some(HashMap::new()), &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }
}
