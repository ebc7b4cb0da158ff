"""The product-instance twin: order taking, manufacturing driving, bidding request, recording."""
