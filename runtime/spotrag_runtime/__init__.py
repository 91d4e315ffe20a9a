"""spotrag's runtime parts: the RAG gateway, the index builder, the node agent
and the vLLM engine emulator used where there is no GPU."""
