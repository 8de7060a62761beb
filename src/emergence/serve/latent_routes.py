"""POST /v1/latent: the web page's view into the latent space (emergence.latent).

Not an OpenAI route (the page's own): for chosen words, a 2-D projection (PCA) of their vectors
at a layer (0: the input embeddings), and for a prompt, the logit lens (the top next tokens read
out of every layer). The work runs in a worker thread, outside the engine's batch: the model's
weights are only read, and the per-layer states are caught for this thread alone.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, FastAPI
from pydantic import Field

from ..errors import EmergenceError
from ..latent import as_in_a_sentence, embed, logit_lens, pca_2d
from .schema import ApiError, Request

Word = Annotated[str, Field(min_length=1, max_length=64)]


class LatentRequest(Request):
    model: str | None = None
    words: Annotated[list[Word], Field(max_length=64)] = []
    layer: int = 0  # 0: input embeddings, i: block i's output, -1: the last block
    prompt: Annotated[str, Field(max_length=4000)] | None = None
    k: Annotated[int, Field(ge=1, le=20)] = 5


def add_latent_routes(app: FastAPI, server, authorized) -> None:
    @app.post("/v1/latent", dependencies=[Depends(authorized)],
              summary="the latent-space view: a 2-D projection of words' vectors and the logit lens of a prompt")
    async def latent(body: LatentRequest):
        if body.model is not None:
            server.check_model(body.model)
        if server.encoder_decoder:
            raise ApiError(400, "the latent-space view takes decoder-only models")
        if len(body.words) == 1:
            raise ApiError(400, "a projection needs at least two words", "words")
        lm = server.lm

        def work() -> dict:
            out: dict = {"layers": lm.config.n_layer + 1}
            if body.words:
                import torch

                vectors = torch.stack([embed(lm.model, lm.tokenizer, as_in_a_sentence(lm.tokenizer, w), layer=body.layer)
                                       for w in body.words])
                out["points"] = [{"word": w, "x": float(x), "y": float(y)}
                                 for w, (x, y) in zip(body.words, pca_2d(vectors).tolist())]
            if body.prompt:
                ids = lm.tokenizer.encode(body.prompt)
                if len(ids) > server.context:
                    raise ApiError(400, f"the prompt has {len(ids)} tokens; the context is {server.context}",
                                   "prompt")
                out["lens"] = [{"layer": r.layer, "tokens": [{"token": t, "probability": p} for t, p in r.tokens]}
                               for r in logit_lens(lm.model, lm.tokenizer, ids or [lm.tokenizer.bos_id or 0], body.k)]
            return out

        try:
            return await asyncio.to_thread(work)
        except EmergenceError as e:
            raise ApiError(400, str(e)) from None
