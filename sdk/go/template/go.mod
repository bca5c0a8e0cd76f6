module __APP__

go 1.24
