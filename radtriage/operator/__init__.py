"""The live operator page: `observer` tails the output topics, `view` folds what it reads
into a bounded picture, `page` serves it at `/` and pushes changes over Server-Sent Events."""
