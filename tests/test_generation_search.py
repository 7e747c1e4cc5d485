"""Beam, diverse beam and contrastive search over the text stream (offline `generate`): one beam and alpha 0 are
greedy decoding exactly, beams find a likelier text than greedy on a trained model, diverse groups differ, the
session's `reorder` moves a conversation whole, and bad values are refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from helpers import GREEDY, tiny_model
from hf_moshi_userpred.models.generation_moshi_search import search_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # streaming tiny models: one intra-op thread (see conftest)


def user_frames(model, batch: int = 2, frames: int = 20, seed: int = 0) -> torch.Tensor:
    c = model.config
    return torch.randint(0, c.card, (batch, c.n_q - c.dep_q, frames), generator=torch.Generator().manual_seed(seed))


def assert_same_generation(a, b, exact_floats: bool = True) -> None:
    """Same tokens; the same probabilities, exactly or (a batch of another size rounds GEMMs differently) to 1e-5."""
    for name in ("text_tokens", "audio_codes", "user_prediction"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("user_probs", "user_entropy"):
        tolerance = 0 if exact_floats else 1e-5
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=tolerance)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


@pytest.mark.parametrize("audio_sampled", [False, True])
def test_one_beam_is_greedy_decoding(model, audio_sampled):
    """`num_beams=1` through the search machinery (forcing, reorder, back-pointers) is greedy text exactly, with the
    same audio and user prediction; with sampled audio too, for the same seed."""
    user = user_frames(model)
    settings = dict(do_sample=False, audio_do_sample=audio_sampled, seed=0, progress=False)
    greedy = model.generate(user, **settings)
    beam = search_generate(model, user, num_beams=1, **settings)
    assert_same_generation(greedy, beam)
    assert beam.sequences_scores.shape == (2,) and (beam.sequences_scores < 0).all()


def test_contrastive_with_alpha_zero_is_greedy_and_alpha_changes_the_text(model):
    user = user_frames(model)
    greedy = model.generate(user, progress=False, **GREEDY)
    unpenalised = search_generate(model, user, penalty_alpha=0.0, top_k=4, progress=False, **GREEDY)
    assert_same_generation(greedy, unpenalised, exact_floats=False)  # 16 slots per input
    contrastive = model.generate(user, penalty_alpha=0.6, top_k=4, progress=False, **GREEDY)
    assert contrastive.text_tokens.shape == greedy.text_tokens.shape
    assert not torch.equal(contrastive.text_tokens, greedy.text_tokens)
    # the degeneration penalty trades likelihood for novelty: its text is less likely than greedy's
    assert (contrastive.sequences_scores < unpenalised.sequences_scores).all()


def test_beams_beat_greedy_on_the_trained_sample_model(demo_model_dir):
    """On held-out dialogues of the shipped sample, the best of 4 beams has a text log-probability >= greedy's (the
    one-beam search's score is greedy's). The 30-step demo model writes only padding, which greedy already finds;
    with the padding suppressed it must choose among words, and the beams find strictly likelier ones."""
    from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
    from hf_moshi_userpred.data.encoding import EncodedDialogues

    model = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    c = model.config
    held_out = EncodedDialogues(demo_model_dir.parent / "encoded" / "eval")
    user = torch.stack([held_out[i]["codes"][1 + c.dep_q :, :40] for i in range(2)])
    for words_only in (False, True):
        settings = dict(progress=False, **GREEDY, **(dict(suppress_tokens=[c.existing_text_padding_id,
                                                                            c.existing_text_end_padding_id])
                                                      if words_only else {}))
        greedy = model.generate(user, **settings)
        one = search_generate(model, user, num_beams=1, **settings)
        assert torch.equal(greedy.text_tokens, one.text_tokens)
        beams = model.generate(user, num_beams=4, **settings)
        assert beams.text_tokens.shape == greedy.text_tokens.shape
        assert beams.audio_codes.shape == greedy.audio_codes.shape
        if words_only:
            assert (beams.sequences_scores > one.sequences_scores).all()
        else:  # a batch of another size rounds differently
            assert (beams.sequences_scores >= one.sequences_scores - 1e-6).all()
    # length_penalty only rescales (every hypothesis has one text token per frame): the same text, score * T
    summed = model.generate(user, num_beams=4, length_penalty=0.0, **settings)
    assert torch.equal(summed.text_tokens, beams.text_tokens)
    torch.testing.assert_close(summed.sequences_scores, beams.sequences_scores * 40)


class ForceText(LogitsProcessor):
    """Forces the text of a hypothesis (`[B, T']` tokens per call, then the most likely token) through a plain
    session, and sums the log-probabilities of the forced tokens."""

    def __init__(self, text: torch.Tensor):
        self.text, self.call, self.log_prob = text, 0, 0.0

    def __call__(self, input_ids, scores):
        log_probs = scores.log_softmax(-1)
        token = self.text[:, self.call] if self.call < self.text.shape[1] else log_probs.argmax(-1)
        self.log_prob = self.log_prob + log_probs.gather(-1, token[:, None])[:, 0]
        self.call += 1
        return torch.full_like(scores, float("-inf")).scatter(-1, token[:, None], 0.0)


@pytest.mark.parametrize("num_beams", [2, 4])
def test_best_beam_replays_with_its_audio_and_score(model, num_beams):
    """Replaying the best beam's text through a plain greedy session gives its audio exactly (each beam carries the
    Depformer's audio for its own tokens) and its score (the mean text log-probability over the T frames)."""
    user = user_frames(model, batch=3)
    best = model.generate(user, num_beams=num_beams, progress=False, **GREEDY)
    replay = ForceText(best.text_tokens)
    out = model.generate(user, text_logits_processor=LogitsProcessorList([replay]), progress=False, **GREEDY)
    assert torch.equal(out.text_tokens, best.text_tokens) and torch.equal(out.audio_codes, best.audio_codes)
    torch.testing.assert_close(replay.log_prob / user.shape[2], best.sequences_scores, rtol=0, atol=1e-5)


def test_diverse_groups_differ(model):
    """Two groups of one beam: without penalty each group is greedy decoding (the two hypotheses are equal); with
    a large one, the second group never says a word token the first says at the same frame (padding is exempt)."""
    c = model.config
    user = user_frames(model, frames=24)
    settings = dict(num_beams=2, num_beam_groups=2, num_return_sequences=2, progress=False, **GREEDY)
    same = model.generate(user, diversity_penalty=0.0, **settings)
    greedy = model.generate(user, progress=False, **GREEDY)
    assert same.text_tokens.shape == (4, greedy.text_tokens.shape[1])
    assert torch.equal(same.text_tokens[0::2], greedy.text_tokens) and torch.equal(same.text_tokens[1::2],
                                                                                  greedy.text_tokens)
    diverse = model.generate(user, diversity_penalty=100.0, **settings).text_tokens.view(2, 2, -1)
    padding = (diverse[:, 0] == c.existing_text_padding_id) | (diverse[:, 0] == c.existing_text_end_padding_id)
    assert (diverse[:, 0] != diverse[:, 1]).any(dim=-1).all()
    assert not ((diverse[:, 0] == diverse[:, 1]) & ~padding).any()


def test_reorder_moves_whole_conversations(model):
    """Two slots fed swapped users, then `reorder([1, 0])`: from there on they continue each other's conversation
    exactly (KV cache, token ring, text history, user prediction); `reorder([0, 0])` clones slot 0."""
    user = user_frames(model, frames=12)
    swapped = user.flip(0)
    with model.streaming(2, **GREEDY) as plain, model.streaming(2, **GREEDY) as moved, \
            model.streaming(2, **GREEDY) as cloned:
        for t in range(12):
            frame = user[:, :, t : t + 1]
            expected = plain.step(frame)
            if t < 6:
                moved.step(swapped[:, :, t : t + 1])
                cloned.step(frame)
                continue
            if t == 6:
                moved.reorder(torch.tensor([1, 0]))
                cloned.reorder(torch.tensor([0, 0]))
            out = moved.step(frame)
            assert torch.equal(out.tokens, expected.tokens) and torch.equal(out.user_prediction,
                                                                            expected.user_prediction)
            out = cloned.step(frame[[0, 0]])
            assert torch.equal(out.tokens, expected.tokens[[0, 0]])


def test_search_runs_with_forced_text(model):
    """Beams carry the forced words (host-side queues included): the forced word comes out of the best beam."""
    user = user_frames(model, batch=1, frames=16)
    word = [[11, 12]]
    out = model.generate(user, num_beams=3, forced_text={2: word}, progress=False, **GREEDY)
    text = out.text_tokens[0].tolist()
    assert any(text[i : i + 2] == word[0] for i in range(len(text) - 1))


@pytest.mark.parametrize("settings, match", [
    (dict(num_beams=0), "num_beams=0"),
    (dict(num_beams=4, num_beam_groups=3), "num_beam_groups=3"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=-1.0), "diversity_penalty=-1.0"),
    (dict(num_beams=4, diversity_penalty=0.5), "diversity_penalty=0.5: .*num_beam_groups"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty=nan"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences.*3"),
    (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha=1.5"),
    (dict(penalty_alpha=0.5, top_k=1), "penalty_alpha=0.5: .*top_k=1"),
    (dict(penalty_alpha=0.5, top_k=4, num_beams=2), "penalty_alpha=0.5: .*num_beams=2"),
])
def test_bad_search_values_are_refused(model, settings, match):
    user = user_frames(model, batch=1, frames=3)
    with pytest.raises(ValueError, match=match):
        model.generate(user, progress=False, **{**GREEDY, **settings})


def test_searching_needs_greedy_text_and_is_offline_only(model):
    user = user_frames(model, batch=1, frames=3)
    with pytest.raises(ValueError, match="do_sample=True.*do_sample=False"):
        model.generate(user, num_beams=2, progress=False)
    with pytest.raises(ValueError, match="num_beams=2: .*offline.*cannot wait"):
        with model.streaming(1, num_beams=2, **GREEDY):
            pass
    with pytest.raises(ValueError, match="penalty_alpha=0.5.*offline"):
        with model.streaming(1, penalty_alpha=0.5, top_k=4, **GREEDY):
            pass
