"""A checker for tests/test_harness.py's generation task: does the continuation use the row's word?"""


def mentions_word(prediction: str, target: str, doc: dict) -> bool:
    return doc["word"].lower() in prediction.lower()
