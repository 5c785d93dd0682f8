"""Student/teacher views through the model, and the TE-spec name aliases of the table."""

import torch

from sdpg_megatron.model.hf_mapping import global_name, te_alias
from tests.helpers import VOCAB, tiny_hf_model


def test_te_spec_names_map_onto_local_spec_names():
    assert te_alias("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == "decoder.layers.3.input_layernorm.weight"
    assert te_alias("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == "decoder.layers.0.pre_mlp_layernorm.weight"
    assert te_alias("decoder.layers.0.mlp.linear_fc1.weight") == "decoder.layers.0.mlp.linear_fc1.weight"
    assert global_name("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", 4) == "decoder.layers.5.pre_mlp_layernorm.weight"


def _views(rank, world_size):
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.provider import model_provider, response_states, transformer_config
    from sdpg_megatron.model.training import build_frozen
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=1, seed=0)
    try:
        arch, hf_model = tiny_hf_model(tied=True)
        state = hf_model.state_dict()
        load = lambda m: load_hf_weights(m, arch, state.__getitem__, padded_vocab=padded_vocab_size(VOCAB, 1),
                                         tp_size=1, tp_rank=0, pp_size=1, pp_rank=0)
        reference = build_frozen(arch, groups, load_weights=load)
        response = torch.tensor([5, 6, 7, 8])
        student = torch.cat([torch.tensor([1, 2]), response])[None]  # prompt of 2
        teacher = torch.cat([torch.tensor([1, 2, 9, 9, 9]), response])[None]  # prompt of 5
        # Position p predicts token p+1: the response is predicted from the last prompt position on.
        student_mask = torch.zeros(1, 6, dtype=torch.bool)
        student_mask[0, 1:5] = True
        teacher_mask = torch.zeros(1, 9, dtype=torch.bool)
        teacher_mask[0, 4:8] = True
        with torch.no_grad():
            s_hidden = reference(student, torch.arange(6)[None], None, return_hidden=True)
            t_hidden = reference(teacher, torch.arange(9)[None], None, return_hidden=True)
            same = reference(teacher, torch.arange(9)[None], None, return_hidden=True)
        s_rows, t_rows = response_states(s_hidden, student_mask), response_states(t_hidden, teacher_mask)
        logits = s_rows @ reference.output_weight().t()
        with torch.no_grad():
            hf_logits = hf_model(student).logits[0, 1:5]
        return {
            "shapes": (tuple(s_rows.shape), tuple(t_rows.shape)),
            "frozen": all(not p.requires_grad for p in reference.parameters()),
            "views_differ": (s_rows - t_rows).abs().max().item(),
            "deterministic": torch.equal(t_hidden, same),
            "logits_vs_hf": (logits[:, :VOCAB] - hf_logits).abs().max().item(),
        }
    finally:
        destroy_parallel()


def test_response_states_align_student_and_teacher_views():
    from tests.distributed import run_distributed

    (result,) = run_distributed(_views, 1)
    assert result["shapes"] == ((4, 128), (4, 128))
    assert result["frozen"] and result["deterministic"]
    assert result["views_differ"] > 1e-3  # the privileged prefix changes the states
    assert result["logits_vs_hf"] < 1e-4  # row i predicts response token i, as in transformers
