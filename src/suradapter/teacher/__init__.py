"""The teacher: offline LLM feature extraction and its content-addressed cache."""
