"""The latent-space view (emergence.latent): per-layer hidden states and the logit lens against
transformers' output_hidden_states (the final norm and head applied by hand to each layer),
neighbors against a brute-force cosine, the contextual "plane" demonstration on the shipped
emergence-6m against transformers' states, the PCA projection against distances it must keep,
and the commands with their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import emergence
from emergence.latent import as_in_a_sentence, contextual, embed, layer_states, logit_lens, neighbors, pca_2d, word_tokens

from conftest import assert_one_line_error, cli_main  # noqa: E402

SIX_M = Path(emergence.__file__).parent / "models" / "emergence-6m"
PLANE = ("plane", "The plane flew over the clouds to the airport.", "A flat plane in geometry has two dimensions.")


def hf_states(hf, ids: list[int]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_hidden_states=True).hidden_states


def test_layer_states_are_transformers_hidden_states(hf_model):
    family, hf, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    ids = torch.randint(3, 96, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, theirs = layer_states(lm.model, ids), hf_states(hf, ids)
    assert ours.shape == (len(theirs), 20, 64) and len(theirs) == lm.config.n_layer + 1
    for i in range(len(theirs) - 1):  # transformers applies the final norm to its last entry only
        assert (ours[i] - theirs[i][0]).abs().max().item() <= 1e-5, (family, i)
    with torch.no_grad():
        assert (lm.model.norm(ours[-1]) - theirs[-1][0]).abs().max().item() <= 1e-5


def test_the_logit_lens_reads_every_layer_through_the_final_norm_and_head(hf_model):
    family, hf, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    ids = [5, 17, 42, 8, 23, 61, 9]
    rows = logit_lens(lm.model, lm.tokenizer, ids, k=4)
    states = hf_states(hf, ids)
    norm = hf.transformer.ln_f if family == "gpt2" else hf.model.norm
    for i, row in enumerate(rows):
        with torch.no_grad():
            h = states[i][0, -1] if i < len(states) - 1 else states[i][0, -1]
            normed = h if i == len(states) - 1 else norm(h)  # the last entry is normed already
            probs = hf.lm_head(normed).softmax(-1)
        top = probs.topk(4)
        assert [t for t, _ in row.tokens] == [lm.tokenizer.id_to_piece(int(t)) for t in top.indices], (family, i)
        assert np.allclose([p for _, p in row.tokens], top.values.numpy(), atol=1e-5)
    with torch.no_grad():  # the last layer's row is the model's own next-token distribution
        final = lm.model(torch.tensor([ids]))[0, -1].softmax(-1).topk(4).values
    assert np.allclose([p for _, p in rows[-1].tokens], final.numpy(), atol=1e-6)


def test_neighbors_are_the_nearest_embeddings_by_cosine():
    lm = emergence.load(SIX_M, device="cpu")
    found = neighbors(lm.model, lm.tokenizer, "dog", k=5)
    table = lm.model.tok_embeddings.weight.detach().double().numpy()
    (dog,) = lm.tokenizer.encode(" dog")  # one token, as inside a sentence
    cos = table @ table[dog] / (np.linalg.norm(table, axis=1) * np.linalg.norm(table[dog]))
    cos[dog] = -np.inf
    expected = np.argsort(-cos)[:5]
    assert [n.token_id for n in found] == expected.tolist()
    assert np.allclose([n.cosine for n in found], cos[expected], atol=1e-6)
    assert "Ġcat" in [n.piece for n in found[:3]]  # what TinyStories taught the shipped model


def test_the_same_word_in_two_contexts_drifts_apart_layer_by_layer():
    lm = emergence.load(SIX_M, device="cpu")
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(SIX_M).eval()
    c = contextual(lm.model, lm.tokenizer, *PLANE)
    assert c.tokens == (["Ġpl", "ane"], ["Ġpl", "ane"]) and len(c.cosine) == 7
    assert c.cosine[0] == pytest.approx(1.0) and c.distance[0] == pytest.approx(0.0, abs=1e-6)
    # the reference: the same cosines from transformers' hidden states (its last entry normed,
    # so the comparison stops one short)
    vectors = []
    for context in PLANE[1:]:
        ids, positions = word_tokens(lm.tokenizer, context, "plane")
        vectors.append(torch.stack([s[0, positions].mean(0) for s in hf_states(hf, ids)]))
    expected = torch.nn.functional.cosine_similarity(*vectors, dim=-1)
    assert np.allclose(c.cosine[:-1], expected[:-1].numpy(), atol=1e-5)
    assert c.cosine[-1] < 0.7 < c.cosine[1]  # context pulls the two senses apart in the upper layers


def test_embed_pools_the_chosen_layers_token_vectors():
    lm = emergence.load(SIX_M, device="cpu")
    text = "Tom saw a big red ball"
    ids = lm.tokenizer.encode(text)
    states = layer_states(lm.model, ids)
    assert torch.equal(embed(lm.model, lm.tokenizer, text, layer=3, pooling="none"), states[3])
    assert torch.allclose(embed(lm.model, lm.tokenizer, text, layer=3), states[3].mean(0))
    assert torch.equal(embed(lm.model, lm.tokenizer, text, layer=-1, pooling="last"), states[6][-1])
    # layer 0 of one token is its row of the embedding table
    (ball,) = lm.tokenizer.encode(" ball")
    assert torch.equal(embed(lm.model, lm.tokenizer, " ball", layer=0), lm.model.tok_embeddings.weight[ball].detach())


def test_pca_keeps_the_distances_of_points_on_a_plane():
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(12, 2)) * [3.0, 1.0]
    basis = np.linalg.qr(rng.normal(size=(32, 2)))[0]  # an orthonormal plane in 32 dimensions
    points = torch.tensor(flat @ basis.T + 5.0)
    out = pca_2d(points).double().numpy()
    dist = lambda x: np.linalg.norm(x[:, None] - x[None], axis=-1)  # noqa: E731
    assert np.allclose(dist(out), dist(flat), atol=1e-5)
    assert out[:, 0].var() > out[:, 1].var()  # the first component carries the larger spread


def test_the_commands_print_json_and_refuse_bad_input_in_one_line(capsys):
    code, out, err = cli_main(capsys, "neighbors", "dog", "-m", SIX_M, "--k", "3", "--json")
    assert code == 0, err
    assert [n["piece"] for n in json.loads(out)][0] == "Ġcat"
    code, out, err = cli_main(capsys, "context", *PLANE, "-m", SIX_M, "--json")
    assert code == 0 and json.loads(out)["cosine"][0] == pytest.approx(1.0)
    code, out, err = cli_main(capsys, "lens", "Once upon a time, there was a little", "-m", SIX_M, "--k", "2", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 7 and rows[-1]["tokens"][0]["piece"] == "Ġgirl"
    code, out, err = cli_main(capsys, "embed", "hello", "-m", SIX_M, "--layer", "2", "--json")
    lm = emergence.load(SIX_M, device="cpu")
    assert np.allclose(json.loads(out)[0]["embedding"], embed(lm.model, lm.tokenizer, "hello", layer=2).numpy(),
                       atol=1e-6)
    code, _, err = cli_main(capsys, "embed", "hello", "-m", SIX_M, "--layer", "9")
    assert_one_line_error(code, err, "layer 9 does not exist: the model has layers 0 \\(embeddings\\) to 6")
    code, _, err = cli_main(capsys, "context", "plane", "no such word here", "a plane", "-m", SIX_M)
    assert_one_line_error(code, err, "'plane' does not occur in 'no such word here'")
    code, _, err = cli_main(capsys, "context", "plane", "a plane", "-m", SIX_M)
    assert_one_line_error(code, err, "exactly two contexts")


def test_the_servers_latent_route_answers_and_refuses_in_openai_shape():
    import urllib.error
    import urllib.request

    from emergence.serve.app import Server, serve_in_thread

    app = Server(emergence.load(SIX_M, device="cpu"), "emergence-6m", slots=2)
    http, _ = serve_in_thread(app)
    base = f"http://127.0.0.1:{http.server_address[1]}/v1/latent"

    def post(body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(base, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        lm = emergence.load(SIX_M, device="cpu")
        status, out = post({"words": ["dog", "cat", "king"], "prompt": "Once upon a time, there was a little", "k": 2})
        assert status == 200 and out["layers"] == 7 and [p["word"] for p in out["points"]] == ["dog", "cat", "king"]
        vectors = torch.stack([embed(lm.model, lm.tokenizer, as_in_a_sentence(lm.tokenizer, w), layer=0)
                               for w in ("dog", "cat", "king")])
        assert np.allclose([[p["x"], p["y"]] for p in out["points"]], pca_2d(vectors).numpy(), atol=1e-5)
        assert out["lens"][-1]["tokens"][0]["token"] == "Ġgirl"
        for body, message in (({"words": ["dog"]}, "at least two words"),
                              ({"words": ["a", "b"], "layer": 9}, "layer 9 does not exist"),
                              ({"prompt": "x", "k": 0}, "k"),
                              ({"model": "other", "prompt": "x"}, "does not exist")):
            status, out = post(body)
            assert status in (400, 404) and message in out["error"]["message"], (body, out)
    finally:
        http.shutdown()
        app.close()
