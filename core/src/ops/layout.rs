//! Layout ops: reshape (metadata only, the data is contiguous).

use crate::shape::elem_count;
use crate::tensor::Tensor;
use crate::{Error, Result};

impl Tensor {
    /// The same elements under a new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if elem_count(shape) != self.elem_count() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "{:?} has {} elements, {shape:?} has {}",
                    self.shape(),
                    self.elem_count(),
                    elem_count(shape)
                ),
            ));
        }
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let storage = self.storage().clone();
        let in_shape = self.shape().to_vec();
        Ok(Tensor::from_op(
            storage,
            shape.to_vec(),
            self.dtype(),
            self.device(),
            "reshape",
            &[self],
            move |_, g| Ok(vec![Some(g.reshape(&in_shape)?)]),
        ))
    }
}
