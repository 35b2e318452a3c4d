"""Shared constants of the data tests."""

FIXTURE_MEMBER = "fixture/docs.json"
FIXTURE_DOCS = {f"doc-{i:02d}": f"Document {i}: " + "lorem ipsum é ∑ 😀 " * (i % 5 + 1)
                for i in range(24)}
