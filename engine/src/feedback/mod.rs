//! RLAIF-V feedback (Yu et al., CVPR 2025): deconfounded sampling, divide-and-conquer labeling (claims checked
//! one yes/no question at a time by a labeler model), scoring and preference pairs with length balancing, and
//! the self-feedback implicit reward for best-of-N at inference.

pub mod claims;
pub mod pairs;
pub mod pipeline;
pub mod reward;
pub mod text;
pub mod verify;
