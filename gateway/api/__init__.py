"""HTTP shapes only: thin routes, request and response schemas, the OpenAI answer format."""
