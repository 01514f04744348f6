"""AdamW as configured: MLX's (no bias correction) by default, torch's with
--adam-bias-correction. Checked on the closed form of the first step: with m = (1-b1) g and
v = (1-b2) g^2, an element with a gradient moves by lr (1-b1)/sqrt(1-b2) = 3.16 lr without the
correction and by lr with it (m/(1-b1) over sqrt(v/(1-b2)) = sign(g))."""

import mlx.core as mx
import numpy as np
import pytest

ROWS = [
    {"prompt": f"Q{i}: what now?", "completion": " Sure, here it is." if i % 2 else " No.",
     "label": bool(i % 2)}
    for i in range(8)
]  # fmt: skip
LR = 1e-3


def _first_step_moves(tiny_llama, tmp_path, correction: bool) -> np.ndarray:
    from mlx_kto import KTOTrainer

    from mlx_lm import load

    model, tok = load(str(tiny_llama))
    args = dict(
        batch_size=4, iters=1, learning_rate=LR, lr_schedule="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, lora_rank=4, max_length=32, seed=0, quiet=True,
        steps_per_save=0, adam_bias_correction=correction,
        adapter_path=str(tmp_path / f"run{int(correction)}"),
    )  # fmt: skip
    KTOTrainer(model, tok, train_dataset=ROWS, args=args, log=lambda *_: None).train()
    w = mx.load(str(tmp_path / f"run{int(correction)}" / "adapters.safetensors"))
    # lora_b starts at zero, so after one step it holds exactly the first update
    moves = [np.abs(np.array(v)).ravel() for k, v in w.items() if k.endswith("lora_b")]
    moves = np.concatenate(moves)
    return moves[moves > 0]


@pytest.mark.parametrize("correction, factor", [(False, 0.1 / 0.001**0.5), (True, 1.0)])
def test_first_adamw_step_matches_the_closed_form(tiny_llama, tmp_path, correction, factor):
    moves = _first_step_moves(tiny_llama, tmp_path, correction)
    assert moves.size > 100
    # eps (1e-8) shrinks only elements whose gradient is tiny: the bulk sits at the closed form
    np.testing.assert_allclose(np.median(moves), LR * factor, rtol=1e-3)
    assert moves.max() <= LR * factor * (1 + 1e-4)
