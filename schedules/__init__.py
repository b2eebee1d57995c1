"""Pure functions of step and layer shared by the trainer, launchers and tests."""
from schedules.counter_rng import counter_uniform, keep_masks, layer_keep_mask
from schedules.exit_loss import (CURRICULA, IMPORTANCE_KINDS, exit_importance, exit_loss_weights,
                                 exits_on)
from schedules.layer_dropout import (DEPTH_SCALES, TIME_SCALES, depth_scale, layer_dropout_rate,
                                     layer_dropout_rates, time_scale)
from schedules.lr import learning_rate
from schedules.speedup import (DecodeCosts, autoregressive_cost, best_draft_config, expected_speedup,
                               expected_speedup_with_costs, expected_tokens_per_layer, expected_tokens_per_round,
                               expected_tokens_per_round_in_runs, round_cost, speedup_of_rounds)
