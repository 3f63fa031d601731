//! Learning-rate schedules, big_vision `utils.create_learning_rate_schedule` semantics:
//! a decay shape over `progress = clip((step − warmup)/(total − warmup), 0, 1)`, then
//! `× min(1, step/warmup)` and `× min(1, (total − step)/cooldown)`.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
    /// `1/sqrt((step + timescale − warmup)/timescale)` after warm-up ("infinite" schedule).
    Rsqrt,
    Constant,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub decay: Decay,
    pub warmup_steps: u64,
    pub cooldown_steps: u64,
    pub total_steps: u64,
    /// rsqrt timescale (big_vision default 10 000).
    pub timescale: f64,
}

impl Schedule {
    /// Multiplier in [0, 1] at `step` (0-based: the first update uses step 0, like optax).
    pub fn at(&self, step: u64) -> f64 {
        let s = step as f64;
        let (w, t) = (self.warmup_steps as f64, self.total_steps as f64);
        let progress = if t > w {
            ((s - w) / (t - w)).clamp(0.0, 1.0)
        } else {
            1.0
        };
        let mut lr = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
            Decay::Rsqrt => {
                if s > w {
                    1.0 / ((s + self.timescale - w) / self.timescale).sqrt()
                } else {
                    1.0
                }
            }
        };
        if self.warmup_steps > 0 {
            lr *= (s / w).min(1.0);
        }
        if self.cooldown_steps > 0 {
            lr *= ((t - s) / self.cooldown_steps as f64).clamp(0.0, 1.0);
        }
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay, warmup: u64, cooldown: u64) -> Schedule {
        Schedule {
            decay,
            warmup_steps: warmup,
            cooldown_steps: cooldown,
            total_steps: 100,
            timescale: 10.0,
        }
    }

    #[test]
    fn warmup_is_linear_then_decays() {
        let s = sched(Decay::Cosine, 10, 0);
        assert_eq!(s.at(0), 0.0);
        assert!((s.at(5) - 0.5).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        assert!((s.at(55) - 0.5).abs() < 1e-12);
        assert!(s.at(100).abs() < 1e-12);
        let l = sched(Decay::Linear, 0, 0);
        assert!((l.at(25) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn rsqrt_and_cooldown() {
        let s = sched(Decay::Rsqrt, 10, 20);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        // step 50: 1/sqrt((50 + 10 - 10)/10) = 1/sqrt(5)
        assert!((s.at(50) - 1.0 / 5f64.sqrt()).abs() < 1e-12);
        // cooldown: at step 90 there are 10 of 20 cooldown steps left → ×0.5
        assert!((s.at(90) - 0.5 / 9f64.sqrt()).abs() < 1e-12);
        assert_eq!(sched(Decay::Constant, 0, 0).at(77), 1.0);
    }
}
